//! HTML building blocks of the report: the stylesheet, tables, escaping and number formats.

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
