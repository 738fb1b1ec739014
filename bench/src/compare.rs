//! `starling-bench compare-report`: turns the per-run JSON files that
//! `bench/compare.sh` collected (`SYSTEM-TRANSPORT-RATE.json`, each written
//! by `messages --json`) into `compare.json`, a Markdown table and two SVG
//! plots (latency and throughput against offered load). The SVG is written
//! here, by hand: a few polylines need no plotting library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::report;

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Directory holding the runs' JSON files.
    #[arg(long)]
    runs: PathBuf,
    /// Where compare.json, compare.md and the SVG plots go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// A rate is sustained if p99 delivery latency is within this bound,
    /// at least 95% of the offered rate was delivered, and nothing was lost.
    #[arg(long, default_value_t = 50.0)]
    bound_ms: f64,
    /// The p99 bounds (ms) at which to find each system's highest sustained
    /// rate (same rule as `--bound-ms`) and compare Starling with Mosquitto at
    /// an equal bound: `max_rate_within` and `ratios` in compare.json.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0])]
    bounds_ms: Vec<f64>,
    /// `bench/scripts/hiccups.py --json` output taken before the ladder: how
    /// much the machine itself stalled the server's and load generator's
    /// cores, copied into compare.json and under the table.
    #[arg(long)]
    noise: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Step {
    rate_offered: f64,
    rate_achieved: f64,
    ack_p50_us: u64,
    ack_p99_us: u64,
    ack_p999_us: u64,
    deliver_p50_us: u64,
    deliver_p99_us: u64,
    deliver_p999_us: u64,
    missing: u64,
    /// Messages delivered; only for judging the step, not written out.
    #[serde(skip)]
    delivered: u64,
    server_cpu_cores: Option<f64>,
    /// Starling's own SendAck p99 over the run (upper bound of its histogram bucket, µs), when
    /// the run scraped its metrics; `None` also when it lies beyond the last finite bucket.
    server_ack_p99_le_us: Option<u64>,
    /// Whether the run has the server's own histogram at all.
    server_ack_measured: bool,
    loadgen_cpu_cores: f64,
    loadgen_saturated: bool,
    /// At least 1% of the sends waited for the in-flight window (the load generator's
    /// `window_bound`): the latencies include waiting for acknowledgements.
    window_bound: bool,
    loadavg_1m_end: f64,
    sustained: bool,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct System {
    steps: Vec<Step>,
    max_sustained_rate: Option<f64>,
    /// For each of `--bounds-ms`: the highest offered rate sustained within it.
    max_rate_within: Vec<MaxRate>,
}

/// The highest offered rate whose step was sustained with delivery p99 within
/// `bound_ms`, and that step's delivery p99; both `None` when no step was.
#[derive(Debug, Clone, Serialize)]
struct MaxRate {
    bound_ms: f64,
    rate: Option<f64>,
    deliver_p99_us: Option<u64>,
}

/// Starling's and Mosquitto's highest sustained rates over one transport at
/// one p99 bound; `ratio` is Starling's over Mosquitto's, `None` unless both
/// sustained some rate.
#[derive(Debug, Serialize)]
struct Ratio {
    transport: String,
    bound_ms: f64,
    starling_rate: Option<f64>,
    mosquitto_rate: Option<f64>,
    ratio: Option<f64>,
}

/// A step is sustained within `bound_ms` if it had no error, delivered
/// something and lost nothing, delivered at least 95% of the offered rate, and
/// its delivery p99 is within the bound.
fn sustained_within(st: &Step, bound_ms: f64) -> bool {
    st.error.is_none()
        && st.delivered > 0
        && st.missing == 0
        && st.rate_achieved >= 0.95 * st.rate_offered
        && (st.deliver_p99_us as f64) <= bound_ms * 1000.0
}

fn max_rate_within(steps: &[Step], bound_ms: f64) -> MaxRate {
    let best = steps
        .iter()
        .filter(|s| sustained_within(s, bound_ms))
        .max_by(|a, b| a.rate_offered.total_cmp(&b.rate_offered));
    MaxRate {
        bound_ms,
        rate: best.map(|s| s.rate_offered),
        deliver_p99_us: best.map(|s| s.deliver_p99_us),
    }
}

/// For each transport both Starling and Mosquitto ran over (systems are named
/// `SYSTEM-TRANSPORT`), and each bound: their highest sustained rates and ratio.
fn ratios(systems: &BTreeMap<String, System>, bounds_ms: &[f64]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for (name, starling) in systems {
        let Some(transport) = name.strip_prefix("starling-") else {
            continue;
        };
        let Some(mosquitto) = systems.get(&format!("mosquitto-{transport}")) else {
            continue;
        };
        let rate_at = |sys: &System, bound: f64| {
            sys.max_rate_within
                .iter()
                .find(|m| m.bound_ms == bound)
                .and_then(|m| m.rate)
        };
        for &bound_ms in bounds_ms {
            let starling_rate = rate_at(starling, bound_ms);
            let mosquitto_rate = rate_at(mosquitto, bound_ms);
            let ratio = match (starling_rate, mosquitto_rate) {
                (Some(s), Some(m)) if m > 0.0 => Some(s / m),
                _ => None,
            };
            out.push(Ratio {
                transport: transport.to_owned(),
                bound_ms,
                starling_rate,
                mosquitto_rate,
                ratio,
            });
        }
    }
    out
}

fn u(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

pub(crate) fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let mut systems: BTreeMap<String, Vec<Step>> = BTreeMap::new();
    let mut params = None;
    let mut machine = None;
    let mut entries: Vec<_> = std::fs::read_dir(&args.runs)
        .with_context(|| format!("reading {}", args.runs.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let Some((system, _rate)) = stem.rsplit_once('-') else {
            continue;
        };
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let o = &v["outcome"];
        if params.is_none() {
            params = Some(v["params"].clone());
            machine = Some(v["machine"].clone());
        }
        let error = o["errors"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_owned);
        let offered = f(o, &["rate_offered"]).unwrap_or(0.0);
        let achieved = f(o, &["rate_achieved"]).unwrap_or(0.0);
        let missing = u(o, &["missing"]);
        let deliver_p99 = u(o, &["deliver_us", "p99_us"]);
        let delivered = u(o, &["counts", "delivered"]);
        let mut step = Step {
            rate_offered: offered,
            rate_achieved: achieved,
            ack_p50_us: u(o, &["ack_us", "p50_us"]),
            ack_p99_us: u(o, &["ack_us", "p99_us"]),
            ack_p999_us: u(o, &["ack_us", "p999_us"]),
            deliver_p50_us: u(o, &["deliver_us", "p50_us"]),
            deliver_p99_us: deliver_p99,
            deliver_p999_us: u(o, &["deliver_us", "p999_us"]),
            missing,
            delivered,
            server_cpu_cores: f(o, &["server_cpu_cores"]),
            server_ack_p99_le_us: o["server_ack"]["p99_le_us"].as_u64(),
            server_ack_measured: o["server_ack"].is_object(),
            loadgen_cpu_cores: f(o, &["loadgen_cpu_cores"]).unwrap_or(0.0),
            loadgen_saturated: o["loadgen_saturated"].as_bool().unwrap_or(false),
            window_bound: o["window_bound"].as_bool().unwrap_or(false),
            loadavg_1m_end: f(o, &["loadavg_1m_end"]).unwrap_or(0.0),
            sustained: false,
            error,
        };
        step.sustained = sustained_within(&step, args.bound_ms);
        systems.entry(system.to_owned()).or_default().push(step);
    }
    anyhow::ensure!(
        !systems.is_empty(),
        "no run files in {}",
        args.runs.display()
    );
    let mut bounds_ms = args.bounds_ms.clone();
    anyhow::ensure!(
        bounds_ms.iter().all(|b| b.is_finite() && *b >= 0.0),
        "--bounds-ms takes non-negative milliseconds, got {bounds_ms:?}"
    );
    bounds_ms.sort_by(f64::total_cmp);
    bounds_ms.dedup();
    let systems: BTreeMap<String, System> = systems
        .into_iter()
        .map(|(k, mut steps)| {
            steps.sort_by(|a, b| a.rate_offered.total_cmp(&b.rate_offered));
            let max_sustained_rate = steps
                .iter()
                .filter(|s| s.sustained)
                .map(|s| s.rate_offered)
                .reduce(f64::max);
            let max_rate_within = bounds_ms
                .iter()
                .map(|&b| max_rate_within(&steps, b))
                .collect();
            (
                k,
                System {
                    steps,
                    max_sustained_rate,
                    max_rate_within,
                },
            )
        })
        .collect();
    let ratios = ratios(&systems, &bounds_ms);
    let noise: Option<Value> = args
        .noise
        .as_deref()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        })
        .transpose()?;
    std::fs::create_dir_all(&args.out)?;
    report::write_json(
        &args.out.join("compare.json"),
        &serde_json::json!({
            "bound_ms": args.bound_ms,
            "sustained_means": "p99 delivery <= bound_ms, >= 95% of offered delivered, none missing, no errors",
            "machine": machine,
            "machine_noise": noise,
            "params_of_first_run": params,
            "systems": systems,
            "bounds_ms": bounds_ms,
            "ratio_means": "per transport and p99 bound: Starling's highest sustained offered rate over Mosquitto's",
            "ratios": ratios,
        }),
    )?;
    let mut md = table(&systems, args.bound_ms);
    md.push_str(&ratio_table(&ratios, &bounds_ms));
    if let Some(n) = &noise {
        md.push_str(&noise_line(n));
    }
    print!("{md}");
    std::fs::write(args.out.join("compare.md"), &md)?;
    write_svg(
        &args.out.join("latency.svg"),
        "p99 send -> delivery latency (ms, log scale) vs offered rate (msg/s)",
        &systems,
        |s| (s.deliver_p99_us > 0).then(|| s.deliver_p99_us as f64 / 1000.0),
        true,
    )?;
    write_svg(
        &args.out.join("throughput.svg"),
        "delivered rate vs offered rate (msg/s)",
        &systems,
        |s| Some(s.rate_achieved),
        false,
    )?;
    Ok(())
}

/// One line on how much the machine stalled each watched core before the ladder.
fn noise_line(n: &Value) -> String {
    let secs = f(n, &["seconds_per_cpu"]).unwrap_or(0.0);
    let cpus: Vec<String> = n["cpus"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            format!(
                "CPU {}: {} gaps over 1 ms, longest {:.2} ms, {:.2}% of the time lost",
                u(c, &["cpu"]),
                u(c, &["gaps_over_1ms"]),
                f(c, &["longest_ms"]).unwrap_or(0.0),
                f(c, &["lost_percent"]).unwrap_or(0.0),
            )
        })
        .collect();
    format!(
        "\nThe machine's own stalls before the ladder (`bench/scripts/hiccups.py`, {secs} s per CPU, servers idle): {}.\n",
        cpus.join("; ")
    )
}

fn table(systems: &BTreeMap<String, System>, bound_ms: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| system | offered/s | delivered/s | ack p50 / p99 / p99.9 ms | delivery p50 / p99 / p99.9 ms | server's own ack p99 ms | server CPU | loadgen CPU | within {bound_ms} ms |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let ms = |us: u64| us as f64 / 1000.0;
    for (name, sys) in systems {
        for st in &sys.steps {
            let note = if let Some(e) = &st.error {
                format!("error: {}", e.chars().take(80).collect::<String>())
            } else {
                // compare.sh pins each server to one core: over 85% of it is saturation, and
                // then a full window is the server's queue, not the window's limit.
                let server_saturated = st
                    .server_cpu_cores
                    .is_some_and(|c| c > crate::report::SATURATED_SHARE);
                let marks: Vec<&str> = [
                    (server_saturated, "server saturated"),
                    (st.loadgen_saturated, "loadgen saturated"),
                    (st.window_bound, "window-bound"),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, m)| *m)
                .collect();
                let verdict = if st.sustained { "yes" } else { "no" };
                if marks.is_empty() {
                    verdict.to_owned()
                } else {
                    format!("{verdict} ({})", marks.join(", "))
                }
            };
            let _ = writeln!(
                s,
                "| {name} | {:.0} | {:.0} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {} | {:.2} | {note} |",
                st.rate_offered,
                st.rate_achieved,
                ms(st.ack_p50_us),
                ms(st.ack_p99_us),
                ms(st.ack_p999_us),
                ms(st.deliver_p50_us),
                ms(st.deliver_p99_us),
                ms(st.deliver_p999_us),
                if st.server_ack_measured {
                    crate::scrape::show_ms(st.server_ack_p99_le_us)
                } else {
                    "-".to_owned()
                },
                st.server_cpu_cores
                    .map_or("-".to_owned(), |c| format!("{c:.2}")),
                st.loadgen_cpu_cores,
            );
        }
    }
    let _ = writeln!(s);
    for (name, sys) in systems {
        let _ = writeln!(
            s,
            "- {name}: highest rate sustained within {bound_ms} ms p99: {}",
            sys.max_sustained_rate
                .map_or("none".to_owned(), |r| format!("{r:.0} msg/s"))
        );
    }
    s
}

/// `1234567.0` as `1,234,567`.
fn thousands(r: f64) -> String {
    let digits = format!("{:.0}", r.abs());
    let mut s = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            s.push(',');
        }
        s.push(c);
    }
    if r < 0.0 { format!("-{s}") } else { s }
}

/// Rows are the bounds, and each transport both systems ran over has a
/// Starling, a Mosquitto and a ratio column. Empty when there is no such transport.
fn ratio_table(ratios: &[Ratio], bounds_ms: &[f64]) -> String {
    let mut transports: Vec<&str> = Vec::new();
    for r in ratios {
        if !transports.contains(&r.transport.as_str()) {
            transports.push(&r.transport);
        }
    }
    if transports.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nHighest offered rate each system sustained with delivery p99 within the bound (≥ 95% delivered, none missing); the ratio compares the two at an equal latency bound.\n"
    );
    let mut header = "| p99 bound |".to_owned();
    let mut rule = "|---|".to_owned();
    for t in &transports {
        let _ = write!(header, " Starling {t} | Mosquitto {t} | ratio {t} |");
        rule.push_str("---:|---:|---:|");
    }
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "{rule}");
    let rate = |r: Option<f64>| r.map_or("none".to_owned(), thousands);
    for &bound in bounds_ms {
        let mut row = format!("| {bound} ms |");
        for t in &transports {
            let r = ratios
                .iter()
                .find(|r| r.transport == *t && r.bound_ms == bound);
            let (st, mq, ratio) = r.map_or((None, None, None), |r| {
                (r.starling_rate, r.mosquitto_rate, r.ratio)
            });
            let ratio = ratio.map_or("-".to_owned(), |x| {
                if x >= 1.0 {
                    format!("{x:.1}×")
                } else {
                    format!("{x:.2}×")
                }
            });
            let _ = write!(row, " {} | {} | {ratio} |", rate(st), rate(mq));
        }
        let _ = writeln!(s, "{row}");
    }
    s
}

/// A round tick step (1, 2 or 5 × 10^k) giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn write_svg(
    path: &Path,
    title: &str,
    systems: &BTreeMap<String, System>,
    y_of: impl Fn(&Step) -> Option<f64>,
    log_y: bool,
) -> anyhow::Result<()> {
    let (w, h, l, r, t, b) = (720.0, 440.0, 70.0, 180.0, 40.0, 50.0);
    let pts: Vec<(f64, f64)> = systems
        .values()
        .flat_map(|s| s.steps.iter())
        .filter(|s| s.error.is_none())
        .filter_map(|s| y_of(s).map(|y| (s.rate_offered, y)))
        .collect();
    let xstep = nice_step(pts.iter().map(|p| p.0).fold(1.0, f64::max));
    let xmax = (pts.iter().map(|p| p.0).fold(1.0, f64::max) / xstep).ceil() * xstep;
    let (ymin, ymax) = if log_y {
        let lo = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min).max(0.01);
        let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(lo * 10.0);
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    } else {
        (
            0.0,
            pts.iter().map(|p| p.1).fold(1.0, f64::max).max(xmax) * 1.05,
        )
    };
    let sx = |x: f64| l + (x / xmax) * (w - l - r);
    let sy = |y: f64| {
        let f = if log_y {
            (y.max(ymin).log10() - ymin.log10()) / (ymax.log10() - ymin.log10())
        } else {
            (y - ymin) / (ymax - ymin)
        };
        h - b - f * (h - t - b)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{l}" y="24" font-size="14">{title}</text>"#);
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    let xticks = (xmax / xstep).round() as u32;
    for i in 0..=xticks {
        let x = xstep * f64::from(i);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
            sx(x),
            h - b + 18.0,
            x
        );
    }
    let yticks: Vec<f64> = if log_y {
        let (a, z) = (ymin.log10() as i32, ymax.log10() as i32);
        (a..=z).map(|e| 10f64.powi(e)).collect()
    } else {
        let step = nice_step(ymax);
        (0..=(ymax / step).round() as u32)
            .map(|i| step * f64::from(i))
            .collect()
    };
    for y in yticks {
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            sy(y),
            w - r,
            l - 6.0,
            sy(y) + 4.0,
            if y < 1.0 {
                format!("{y}")
            } else {
                format!("{y:.0}")
            }
        );
    }
    for (i, (name, sys)) in systems.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let line: Vec<String> = sys
            .steps
            .iter()
            .filter(|s| s.error.is_none())
            .filter_map(|s| y_of(s).map(|y| format!("{:.1},{:.1}", sx(s.rate_offered), sy(y))))
            .collect();
        if !line.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                line.join(" ")
            );
            for p in &line {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
            }
        }
        let ly = t + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}">{name}{}</text>"#,
            w - r + 10.0,
            ly,
            w - r + 28.0,
            ly + 10.0,
            if line.is_empty() { " (no data)" } else { "" }
        );
    }
    let _ = writeln!(s, "</svg>");
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_file(rate: f64, p99_us: u64) -> Value {
        serde_json::json!({
            "params": {"pairs": 2},
            "machine": {"cpus": 2},
            "outcome": {
                "rate_offered": rate,
                "rate_achieved": rate,
                "missing": 0,
                "errors": [],
                "counts": {"delivered": 1000},
                "ack_us": {"p50_us": 500, "p99_us": p99_us, "p999_us": p99_us},
                "deliver_us": {"p50_us": 500, "p99_us": p99_us, "p999_us": p99_us},
                "server_cpu_cores": 0.5,
                "server_ack": {"count": 1000, "p50_le_us": 250, "p99_le_us": 1500},
                "loadgen_cpu_cores": 0.3,
            },
        })
    }

    #[test]
    fn the_report_judges_each_step_and_carries_the_machine_noise() {
        let dir = std::env::temp_dir().join(format!("sb-compare-{}", std::process::id()));
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        for (rate, p99) in [(10_000.0, 2_000), (20_000.0, 80_000)] {
            let path = runs.join(format!("starling-plain-{rate}.json"));
            let mut run = run_file(rate, p99);
            // The slow step's sends waited for the in-flight window.
            run["outcome"]["window_bound"] = Value::Bool(p99 > 50_000);
            if p99 > 50_000 {
                run["outcome"]["server_cpu_cores"] = serde_json::json!(0.9);
            }
            std::fs::write(path, run.to_string()).unwrap();
        }
        let noise = dir.join("noise.json");
        std::fs::write(
            &noise,
            r#"{"seconds_per_cpu": 5, "cpus": [{"cpu": 0, "gaps_over_1ms": 3, "longest_ms": 2.5, "lost_percent": 0.4}]}"#,
        )
        .unwrap();
        let out = dir.join("out");
        run(&CompareArgs {
            runs,
            out: out.clone(),
            bound_ms: 50.0,
            bounds_ms: vec![50.0],
            noise: Some(noise),
        })
        .unwrap();
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap())
                .unwrap();
        let sys = &j["systems"]["starling-plain"];
        assert_eq!(sys["max_sustained_rate"], 10_000.0);
        assert_eq!(sys["steps"][1]["sustained"], false);
        assert_eq!(j["machine_noise"]["cpus"][0]["longest_ms"], 2.5);
        let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
        assert!(
            md.contains("CPU 0: 3 gaps over 1 ms, longest 2.50 ms, 0.40% of the time lost"),
            "{md}"
        );
        assert!(md.contains("| 0.50 / 2.00 / 2.00 | ≤ 1.5 | 0.50 |"), "{md}");
        assert_eq!(sys["steps"][0]["server_ack_p99_le_us"], 1500);
        assert_eq!(sys["steps"][1]["window_bound"], true);
        assert!(
            md.contains("| 0.90 | 0.30 | no (server saturated, window-bound) |"),
            "{md}"
        );
        assert!(md.contains("| 0.30 | yes |"), "{md}");
        assert!(out.join("latency.svg").exists() && out.join("throughput.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_report_compares_the_systems_at_equal_p99_bounds() {
        let dir = std::env::temp_dir().join(format!("sb-compare-ratio-{}", std::process::id()));
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        // (system, offered rate, delivery p99 µs, missing)
        let steps: [(&str, f64, u64, u64); 7] = [
            ("starling-plain", 10_000.0, 2_000, 0),
            ("starling-plain", 20_000.0, 8_000, 0),
            // Fast, but it lost messages: sustained within no bound.
            ("starling-plain", 30_000.0, 5_000, 10),
            ("starling-plain", 40_000.0, 80_000, 0),
            ("mosquitto-plain", 10_000.0, 4_000, 0),
            ("mosquitto-plain", 20_000.0, 60_000, 0),
            // Starling over TLS has no Mosquitto to compare with.
            ("starling-tls", 10_000.0, 3_000, 0),
        ];
        for (system, rate, p99, missing) in steps {
            let mut run = run_file(rate, p99);
            run["outcome"]["missing"] = serde_json::json!(missing);
            let path = runs.join(format!("{system}-{rate}.json"));
            std::fs::write(path, run.to_string()).unwrap();
        }
        let out = dir.join("out");
        run(&CompareArgs {
            runs,
            out: out.clone(),
            bound_ms: 50.0,
            bounds_ms: vec![50.0, 2.0, 10.0],
            noise: None,
        })
        .unwrap();
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap())
                .unwrap();
        let st = &j["systems"]["starling-plain"];
        let mq = &j["systems"]["mosquitto-plain"];
        // The --bound-ms verdicts are as before.
        assert_eq!(st["max_sustained_rate"], 20_000.0);
        assert_eq!(mq["max_sustained_rate"], 10_000.0);
        // The bounds come out sorted.
        assert_eq!(
            st["max_rate_within"],
            serde_json::json!([
                {"bound_ms": 2.0, "rate": 10_000.0, "deliver_p99_us": 2_000},
                {"bound_ms": 10.0, "rate": 20_000.0, "deliver_p99_us": 8_000},
                {"bound_ms": 50.0, "rate": 20_000.0, "deliver_p99_us": 8_000},
            ])
        );
        assert_eq!(
            mq["max_rate_within"][0],
            serde_json::json!({"bound_ms": 2.0, "rate": null, "deliver_p99_us": null})
        );
        assert_eq!(mq["max_rate_within"][1]["rate"], 10_000.0);
        assert_eq!(mq["max_rate_within"][1]["deliver_p99_us"], 4_000);
        // Only plain has both systems.
        assert_eq!(
            j["ratios"],
            serde_json::json!([
                {"transport": "plain", "bound_ms": 2.0, "starling_rate": 10_000.0,
                 "mosquitto_rate": null, "ratio": null},
                {"transport": "plain", "bound_ms": 10.0, "starling_rate": 20_000.0,
                 "mosquitto_rate": 10_000.0, "ratio": 2.0},
                {"transport": "plain", "bound_ms": 50.0, "starling_rate": 20_000.0,
                 "mosquitto_rate": 10_000.0, "ratio": 2.0},
            ])
        );
        let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
        assert!(
            md.contains("- starling-plain: highest rate sustained within 50 ms p99: 20000 msg/s"),
            "{md}"
        );
        assert!(
            md.contains("Highest offered rate each system sustained with delivery p99 within the bound (≥ 95% delivered, none missing); the ratio compares the two at an equal latency bound."),
            "{md}"
        );
        assert!(
            md.contains("| p99 bound | Starling plain | Mosquitto plain | ratio plain |"),
            "{md}"
        );
        assert!(md.contains("| 2 ms | 10,000 | none | - |"), "{md}");
        assert!(md.contains("| 10 ms | 20,000 | 10,000 | 2.0× |"), "{md}");
        assert!(!md.contains("Starling tls"), "{md}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(40_000.0), "40,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
    }
}
