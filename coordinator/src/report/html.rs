//! HTML building blocks of the report: the stylesheet, tables, escaping, number formats and the
//! inline SVG loss curve.

pub(super) const CSS: &str = "\
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}\
dt{font-weight:600}dd{margin:0;word-break:break-all}\
.badge{padding:.1em .5em;border-radius:.3em;color:#fff;background:#777}\
.badge.succeeded{background:#2a7}.badge.failed{background:#c33}.badge.cancelled{background:#a80}\
.badge.running{background:#27c}td.failed{color:#c33}td.cancelled{color:#a80}\
.error{border:1px solid #c33;background:#fee;padding:.6em;\
white-space:pre-wrap;font-family:monospace}\
.pos{color:#080}.neg{color:#c00}tr.chosen{background:#efe;font-weight:600}\
svg text{font-size:11px;fill:#444}.muted{color:#777}";

/// Opens a table with the given (trusted, literal) column headers.
pub(super) fn table_head(cols: &[&str]) -> String {
    let ths: String = cols.iter().map(|c| format!("<th>{c}</th>")).collect();
    format!("<table>\n<tr>{ths}</tr>\n")
}

/// One table row; each cell is (CSS class, already-escaped content).
pub(super) fn table_row(tr_class: &str, cells: &[(&str, String)]) -> String {
    let tds: String = cells
        .iter()
        .map(|(cls, text)| match *cls {
            "" => format!("<td>{text}</td>"),
            cls => format!("<td class=\"{cls}\">{text}</td>"),
        })
        .collect();
    match tr_class {
        "" => format!("<tr>{tds}</tr>\n"),
        cls => format!("<tr class=\"{cls}\">{tds}</tr>\n"),
    }
}

/// HTML-escapes `s` for use in element content and quoted attribute values.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Formats `v` with `decimals` fixed decimals, or "—" when it is not finite.
pub(super) fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "—".into()
    }
}

/// Formats a duration estimate as "45 s", "6 min" or "1.5 h".
pub(super) fn human_secs(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s.is_finite() && s >= 0.0 => {
            if s < 59.5 {
                format!("{s:.0} s")
            } else if s < 3570.0 {
                format!("{:.0} min", s / 60.0)
            } else {
                format!("{:.1} h", s / 3600.0)
            }
        }
        _ => "—".into(),
    }
}

/// Signed delta with 4 decimals and its CSS class ("pos", "neg" or "" when it rounds to zero).
pub(super) fn delta(base: f64, tuned: f64) -> (String, &'static str) {
    let d = tuned - base;
    if !d.is_finite() {
        return ("—".into(), "");
    }
    let rounded = (d * 10_000.0).round() / 10_000.0;
    if rounded > 0.0 {
        (format!("{d:+.4}"), "pos")
    } else if rounded < 0.0 {
        (format!("{d:+.4}"), "neg")
    } else {
        ("0.0000".into(), "")
    }
}

/// CSS class for a job or stage state; unknown states get no colour.
pub(super) fn state_class(state: &str) -> &'static str {
    match state {
        "succeeded" => "succeeded",
        "failed" => "failed",
        "cancelled" => "cancelled",
        "running" => "running",
        _ => "",
    }
}

/// Inline SVG loss curve, or a note when there is nothing to draw.
pub(super) fn loss_svg(losses: &[(usize, f32)]) -> String {
    let pts: Vec<(f64, f64)> = losses
        .iter()
        .map(|&(s, l)| (s as f64, f64::from(l)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    if pts.is_empty() {
        return "<p class=\"muted\">no training steps recorded</p>".into();
    }
    let (w, h, left, right, top, bottom) = (640.0, 240.0, 64.0, 16.0, 12.0, 36.0);
    let (mut s0, mut s1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut l0, mut l1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(s, l) in &pts {
        (s0, s1, l0, l1) = (s0.min(s), s1.max(s), l0.min(l), l1.max(l));
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    // A zero span (one point, or equal values) is drawn in the middle instead of dividing by 0.
    let sx = |s: f64| {
        if s1 > s0 {
            left + (s - s0) / (s1 - s0) * pw
        } else {
            left + pw / 2.0
        }
    };
    let sy = |l: f64| {
        if l1 > l0 {
            top + (l1 - l) / (l1 - l0) * ph
        } else {
            top + ph / 2.0
        }
    };
    let coords: Vec<String> = pts
        .iter()
        .map(|&(s, l)| format!("{:.1},{:.1}", sx(s), sy(l)))
        .collect();
    let (x0, x1, yb) = (left, w - right, h - bottom);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
         viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" aria-label=\"training loss\">\n\
         <line x1=\"{x0:.1}\" y1=\"{yb:.1}\" x2=\"{x1:.1}\" y2=\"{yb:.1}\" stroke=\"#999\"/>\n\
         <line x1=\"{x0:.1}\" y1=\"{top:.1}\" x2=\"{x0:.1}\" y2=\"{yb:.1}\" stroke=\"#999\"/>\n\
         <polyline fill=\"none\" stroke=\"#27c\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        coords.join(" ")
    );
    if pts.len() == 1 {
        out.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#27c\"/>\n",
            sx(pts[0].0),
            sy(pts[0].1)
        ));
    }
    out.push_str(&format!(
        "<text x=\"{x0:.1}\" y=\"{:.1}\" text-anchor=\"start\">step {s0:.0}</text>\n\
         <text x=\"{x1:.1}\" y=\"{:.1}\" text-anchor=\"end\">step {s1:.0}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n</svg>\n",
        yb + 16.0,
        yb + 16.0,
        left - 6.0,
        top + 10.0,
        num(l1, 4),
        left - 6.0,
        yb,
        num(l0, 4),
    ));
    let skipped = losses.len() - pts.len();
    if skipped > 0 {
        out.push_str(&format!(
            "<p class=\"muted\">{skipped} non-finite loss value(s) not drawn</p>\n"
        ));
    }
    out
}

/// Inline SVG of base-vs-fine-tuned changes with their 95% intervals: one row per metric, a
/// zero line, the interval as a bar and the change as a dot (green when the whole interval is
/// above zero, red when below, grey when it spans zero), on an axis with labelled ends.
pub(super) fn interval_svg(rows: &[(&str, &ragd_engine::eval::compare::DeltaInterval)]) -> String {
    let finite = |d: &&ragd_engine::eval::compare::DeltaInterval| {
        [d.low, d.high, d.delta].iter().all(|v| v.is_finite())
    };
    let rows: Vec<_> = rows.iter().filter(|(_, d)| finite(d)).collect();
    if rows.is_empty() {
        return "<p class=\"muted\">no interval recorded</p>".into();
    }
    let lo = rows.iter().map(|(_, d)| d.low).fold(0.0_f64, f64::min);
    let hi = rows.iter().map(|(_, d)| d.high).fold(0.0_f64, f64::max);
    let pad = ((hi - lo) * 0.1).max(0.005);
    let (lo, hi) = (lo - pad, hi + pad);
    let (w, left, right, row_h, top) = (640.0, 96.0, 24.0, 34.0, 10.0);
    let h = top + row_h * rows.len() as f64 + 34.0;
    let x = |v: f64| left + (v - lo) / (hi - lo) * (w - left - right);
    let axis_y = top + row_h * rows.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
         viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" aria-label=\"change with 95% interval\">\n\
         <line x1=\"{left:.1}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#999\"/>\n\
         <line x1=\"{z:.1}\" y1=\"{top:.1}\" x2=\"{z:.1}\" y2=\"{axis_y:.1}\" stroke=\"#666\" stroke-dasharray=\"4 3\"/>\n\
         <text x=\"{z:.1}\" y=\"{:.1}\" text-anchor=\"middle\">0</text>\n\
         <text x=\"{left:.1}\" y=\"{:.1}\" text-anchor=\"start\">{}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
        w - right,
        axis_y + 16.0,
        axis_y + 30.0,
        signed(lo),
        w - right,
        axis_y + 30.0,
        signed(hi),
        z = x(0.0),
    );
    for (i, (name, d)) in rows.iter().enumerate() {
        let y = top + row_h * (i as f64 + 0.5);
        let color = if d.low > 0.0 {
            "#1a7f37"
        } else if d.high < 0.0 {
            "#c62828"
        } else {
            "#777"
        };
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-width=\"6\" stroke-linecap=\"round\" opacity=\"0.45\"/>\n\
             <circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{} [{} .. {}]</text>\n",
            left - 8.0,
            y + 4.0,
            escape(name),
            x(d.low),
            x(d.high),
            x(d.delta),
            x(d.delta),
            y - 9.0,
            signed(d.delta),
            signed(d.low),
            signed(d.high),
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// A change with its sign, four decimals.
fn signed(v: f64) -> String {
    format!("{v:+.4}")
}
