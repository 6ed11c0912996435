//! The report's inline SVG charts: the loss curve (raw and smoothed, on ticked axes), changes
//! with their 95% intervals, base vs fine-tuned per Matryoshka dimension, and counts as bars.
//! Every chart draws only finite values and says so in words when nothing is left to draw.

use super::html::{escape, num};
use ragd_engine::eval::compare::DeltaInterval;

/// Plot geometry: outer size and the margins around the plotting area.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Frame {
    fn plot_w(&self) -> f64 {
        self.w - self.left - self.right
    }
    fn plot_h(&self) -> f64 {
        self.h - self.top - self.bottom
    }
    fn open(&self, label: &str) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
             viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" aria-label=\"{label}\">\n",
            w = self.w,
            h = self.h
        )
    }
}

/// Maps `v` in `lo..=hi` onto `a..=b`; a zero span maps to the middle instead of dividing by 0.
fn scale(v: f64, lo: f64, hi: f64, a: f64, b: f64) -> f64 {
    if hi > lo {
        a + (v - lo) / (hi - lo) * (b - a)
    } else {
        (a + b) / 2.0
    }
}

/// About `target` round tick values (1, 2 or 5 times a power of ten apart) within `lo..=hi`,
/// with the decimals that tell them apart.
pub(super) fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return (vec![lo], 4);
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), decimals)
}

/// Centred moving average over `window` points (fewer at the ends).
pub(super) fn smooth(values: &[f64], window: usize) -> Vec<f64> {
    let half = window / 2;
    (0..values.len())
        .map(|i| {
            let a = i.saturating_sub(half);
            let b = (i + half + 1).min(values.len());
            values[a..b].iter().sum::<f64>() / (b - a) as f64
        })
        .collect()
}

/// Inline SVG loss curve: the raw losses faint, their moving average bold, on axes with round
/// ticks and titles; or a note when there is nothing to draw.
pub(super) fn loss_svg(losses: &[(usize, f32)]) -> String {
    let pts: Vec<(f64, f64)> = losses
        .iter()
        .map(|&(s, l)| (s as f64, f64::from(l)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    if pts.is_empty() {
        return "<p class=\"muted\">no training steps recorded</p>".into();
    }
    let f = Frame {
        w: 640.0,
        h: 260.0,
        left: 64.0,
        right: 16.0,
        top: 12.0,
        bottom: 44.0,
    };
    let (mut s0, mut s1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut l0, mut l1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(s, l) in &pts {
        (s0, s1, l0, l1) = (s0.min(s), s1.max(s), l0.min(l), l1.max(l));
    }
    let (yb, xr) = (f.h - f.bottom, f.w - f.right);
    let sx = |s: f64| scale(s, s0, s1, f.left, xr);
    let sy = |l: f64| scale(l, l0, l1, yb, f.top);
    let line = |ys: &[f64]| -> String {
        pts.iter()
            .zip(ys)
            .map(|(&(s, _), &l)| format!("{:.1},{:.1}", sx(s), sy(l)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = f.open("training loss");
    let (yt, yd) = ticks(l0, l1, 5);
    for t in yt {
        let y = sy(t);
        out.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{xr:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            f.left,
            f.left - 6.0,
            y + 4.0,
            num(t, yd),
        ));
    }
    let (xt, xd) = ticks(s0, s1, 6);
    for t in xt {
        let x = sx(t);
        out.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{yb:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            yb + 4.0,
            yb + 16.0,
            num(t, xd),
        ));
    }
    out.push_str(&format!(
        "<line x1=\"{l:.1}\" y1=\"{yb:.1}\" x2=\"{xr:.1}\" y2=\"{yb:.1}\" stroke=\"#999\"/>\n\
         <line x1=\"{l:.1}\" y1=\"{t:.1}\" x2=\"{l:.1}\" y2=\"{yb:.1}\" stroke=\"#999\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n\
         <text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">loss</text>\n",
        f.left + f.plot_w() / 2.0,
        yb + 34.0,
        f.top + f.plot_h() / 2.0,
        f.top + f.plot_h() / 2.0,
        l = f.left,
        t = f.top,
    ));
    let raw: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let window = (pts.len() / 10).max(1) | 1;
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#27c\" stroke-width=\"1\" opacity=\"{}\" points=\"{}\"/>\n",
        if window > 1 { "0.3" } else { "1" },
        line(&raw)
    ));
    if window > 1 {
        out.push_str(&format!(
            "<polyline class=\"smoothed\" fill=\"none\" stroke=\"#27c\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(&smooth(&raw, window))
        ));
    }
    if pts.len() == 1 {
        out.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#27c\"/>\n",
            sx(pts[0].0),
            sy(pts[0].1)
        ));
    }
    out.push_str("</svg>\n");
    if window > 1 {
        out.push_str(&format!(
            "<p class=\"muted\">faint: the loss of each logged step; bold: its moving average \
             over {window} logged steps</p>\n"
        ));
    }
    let skipped = losses.len() - pts.len();
    if skipped > 0 {
        out.push_str(&format!(
            "<p class=\"muted\">{skipped} non-finite loss value(s) not drawn</p>\n"
        ));
    }
    out
}

/// Green when the whole interval is above zero, red when below, grey when it spans zero.
fn interval_color(d: &DeltaInterval) -> &'static str {
    if d.above_zero() {
        "#1a7f37"
    } else if d.below_zero() {
        "#c62828"
    } else {
        "#777"
    }
}

fn finite(d: &DeltaInterval) -> bool {
    [d.base, d.tuned, d.delta, d.low, d.high]
        .iter()
        .all(|v| v.is_finite())
}

/// Inline SVG of base-vs-fine-tuned changes with their 95% intervals: one row per metric, a
/// zero line, the interval as a bar and the change as a dot (coloured by [`interval_color`]),
/// on an axis with labelled ends.
pub(super) fn interval_svg(rows: &[(&str, &DeltaInterval)]) -> String {
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
        let color = interval_color(d);
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

/// Inline SVG of one metric per Matryoshka dimension on the metric's own scale: the base score
/// as a hollow circle, the fine-tuned score as a dot, and the bar where the fine-tuned score
/// lies by the 95% interval of the paired change (base + low .. base + high).
pub(super) fn dims_svg(metric: &str, rows: &[(usize, &DeltaInterval)]) -> String {
    let rows: Vec<_> = rows.iter().filter(|(_, d)| finite(d)).collect();
    if rows.is_empty() {
        return format!(
            "<p class=\"muted\">no {} interval recorded</p>",
            escape(metric)
        );
    }
    let lo = rows
        .iter()
        .map(|(_, d)| d.base.min(d.base + d.low).min(d.tuned))
        .fold(f64::INFINITY, f64::min);
    let hi = rows
        .iter()
        .map(|(_, d)| d.base.max(d.base + d.high).max(d.tuned))
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.08).max(0.005);
    let (lo, hi) = (lo - pad, hi + pad);
    let row_h = 34.0;
    let f = Frame {
        w: 640.0,
        h: 12.0 + row_h * rows.len() as f64 + 40.0,
        left: 80.0,
        right: 24.0,
        top: 12.0,
        bottom: 40.0,
    };
    let (yb, xr) = (f.h - f.bottom, f.w - f.right);
    let x = |v: f64| scale(v, lo, hi, f.left, xr);
    let mut out = f.open(&format!("{} per dimension", escape(metric)));
    let (xt, xd) = ticks(lo, hi, 6);
    for t in xt {
        let xv = x(t);
        out.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"{:.1}\" x2=\"{xv:.1}\" y2=\"{yb:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            f.top,
            yb + 16.0,
            num(t, xd),
        ));
    }
    out.push_str(&format!(
        "<line x1=\"{:.1}\" y1=\"{yb:.1}\" x2=\"{xr:.1}\" y2=\"{yb:.1}\" stroke=\"#999\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
        f.left,
        f.left + f.plot_w() / 2.0,
        yb + 32.0,
        escape(metric),
    ));
    for (i, (dim, d)) in rows.iter().enumerate() {
        let y = f.top + row_h * (i as f64 + 0.5) + 6.0;
        let color = interval_color(d);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">dim {dim}</text>\n\
             <line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-width=\"6\" stroke-linecap=\"round\" opacity=\"0.45\"/>\n\
             <circle class=\"base\" cx=\"{:.1}\" cy=\"{y:.1}\" r=\"4.5\" fill=\"#fff\" stroke=\"#333\" stroke-width=\"1.5\"/>\n\
             <circle class=\"tuned\" cx=\"{:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} → {} ({} [{} .. {}])</text>\n",
            f.left - 8.0,
            y + 4.0,
            x(d.base + d.low),
            x(d.base + d.high),
            x(d.base),
            x(d.tuned),
            f.left + f.plot_w() / 2.0,
            y - 10.0,
            num(d.base, 4),
            num(d.tuned, 4),
            signed(d.delta),
            signed(d.low),
            signed(d.high),
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// Inline SVG bar chart of named counts, one horizontal bar per row in the given order, the
/// count written at the bar's end; `highlight` names the rows drawn in green (the rest grey).
pub(super) fn bars_svg(label: &str, rows: &[(String, u64)], highlight: &[&str]) -> String {
    if rows.is_empty() {
        return "<p class=\"muted\">nothing counted</p>".into();
    }
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let row_h = 22.0;
    let f = Frame {
        w: 640.0,
        h: 8.0 + row_h * rows.len() as f64 + 8.0,
        left: 200.0,
        right: 72.0,
        top: 8.0,
        bottom: 8.0,
    };
    let mut out = f.open(&escape(label));
    for (i, (name, n)) in rows.iter().enumerate() {
        let y = f.top + row_h * i as f64;
        let bw = *n as f64 / max * f.plot_w();
        let color = if highlight.contains(&name.as_str()) {
            "#1a7f37"
        } else {
            "#999"
        };
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{n}</text>\n",
            f.left - 8.0,
            y + 15.0,
            escape(name),
            f.left,
            y + 3.0,
            row_h - 6.0,
            f.left + bw + 6.0,
            y + 15.0,
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// A change with its sign, four decimals.
fn signed(v: f64) -> String {
    format!("{v:+.4}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        let (t, d) = ticks(0.123, 0.987, 5);
        assert_eq!(t, vec![0.2, 0.4, 0.6000000000000001, 0.8]);
        assert_eq!(d, 1);
        let (t, d) = ticks(0.0, 1840.0, 6);
        assert_eq!(t, vec![0.0, 500.0, 1000.0, 1500.0]);
        assert_eq!(d, 0);
        assert_eq!(ticks(2.0, 2.0, 5).0, vec![2.0], "a zero span has one tick");
    }

    #[test]
    fn smoothing_is_a_centred_mean() {
        assert_eq!(
            smooth(&[1.0, 2.0, 3.0, 4.0, 5.0], 3),
            vec![1.5, 2.0, 3.0, 4.0, 4.5]
        );
        assert_eq!(smooth(&[7.0, 1.0], 1), vec![7.0, 1.0]);
    }

    #[test]
    fn long_runs_get_a_smoothed_line_and_axis_titles() {
        let losses: Vec<(usize, f32)> = (0..200)
            .map(|s| {
                (
                    s,
                    2.0 / (1.0 + s as f32 / 20.0) + if s % 2 == 0 { 0.3 } else { 0.0 },
                )
            })
            .collect();
        let svg = loss_svg(&losses);
        assert!(svg.contains("class=\"smoothed\""));
        assert!(svg.contains(">step</text>") && svg.contains(">loss</text>"));
        assert!(svg.contains("moving average over 21 logged steps"), "{svg}");
        assert!(svg.contains(">100</text>"), "a round step tick: {svg}");
        // Too few points to smooth: the raw line alone, fully opaque.
        let short = loss_svg(&losses[..10]);
        assert!(!short.contains("smoothed") && short.contains("opacity=\"1\""));
    }

    fn interval(base: f64, delta: f64, low: f64, high: f64) -> DeltaInterval {
        DeltaInterval {
            base,
            tuned: base + delta,
            delta,
            low,
            high,
        }
    }

    #[test]
    fn dimensions_are_drawn_on_the_metric_scale() {
        let (a, b) = (
            interval(0.60, 0.05, 0.01, 0.09),
            interval(0.55, 0.01, -0.02, 0.04),
        );
        let svg = dims_svg("MRR@10", &[(384, &a), (64, &b)]);
        assert!(svg.contains(">dim 384</text>") && svg.contains(">dim 64</text>"));
        assert!(svg.contains("0.6000 → 0.6500 (+0.0500 [+0.0100 .. +0.0900])"));
        assert_eq!(svg.matches("class=\"base\"").count(), 2);
        assert_eq!(
            svg.matches("fill=\"#1a7f37\"").count(),
            1,
            "dim 384 is better"
        );
        assert_eq!(svg.matches("fill=\"#777\"").count(), 1, "dim 64 spans zero");
        let nan = interval(f64::NAN, 0.0, 0.0, 0.0);
        assert!(dims_svg("MRR@10", &[(384, &nan)]).contains("no MRR@10 interval"));
    }

    #[test]
    fn bars_scale_to_the_largest_count() {
        let rows = vec![
            ("kept".to_string(), 300),
            ("dropped_round_trip".to_string(), 150),
            ("dropped <dup>".to_string(), 0),
        ];
        let svg = bars_svg("filter", &rows, &["kept"]);
        let width = |name: &str| {
            let at = svg.find(&format!(">{name}</text>")).unwrap();
            let rest = &svg[at..];
            let w = rest.find("width=\"").unwrap() + 7;
            rest[w..w + rest[w..].find('"').unwrap()]
                .parse::<f64>()
                .unwrap()
        };
        assert_eq!(width("kept"), 368.0);
        assert_eq!(width("dropped_round_trip"), 184.0);
        assert_eq!(width("dropped &lt;dup&gt;"), 0.0);
        assert_eq!(svg.matches("fill=\"#1a7f37\"").count(), 1);
        assert!(bars_svg("x", &[], &[]).contains("nothing counted"));
    }
}
