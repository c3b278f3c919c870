//! The final table: every berth figure beside its anchor, from the JSON lines `bench/run.sh` collected.

use anyhow::Context;
use serde_json::Value;

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn rate(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.0}/s"))
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| {
        if x < 10.0 {
            format!("{x:.2} ms")
        } else {
            format!("{x:.1} ms")
        }
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn count(n: i64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

pub fn print(path: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let find = |part: &str, label: Option<&str>| -> Vec<&Value> {
        lines
            .iter()
            .filter(|v| v["part"] == part && label.is_none_or(|l| v["label"] == l))
            .collect()
    };
    let meta = find("meta", None);
    if let Some(m) = meta.first() {
        println!("berth bench  {}", m["summary"].as_str().unwrap_or(""));
    }
    let w = 50;
    let row = |what: &str, berth: String, anchor: String, r: String| {
        println!("  {what:<w$} {berth:>16}  {anchor:<48} {r:>7}");
    };

    let queue = find("queue", None);
    let pgbench = find("pgbench", None).first().and_then(|v| f(v, "tps"));
    if !queue.is_empty() || pgbench.is_some() {
        println!();
        println!(
            "QUEUE  no-op task throughput (durable Postgres: fsync on, synchronous_commit on)"
        );
        let pg = find("pgbench", None).first().copied();
        let pg_head = pg.map_or("pgbench: not run".to_string(), |p| {
            format!("/ pgbench {:.0} tps", p["tps"].as_f64().unwrap_or(0.0))
        });
        println!(
            "  {:<w$} {:>9}  {:>20} {:>7}  {:>20}",
            "", "berth", "graphile-worker 4x24", "ratio", pg_head
        );
        let small_n = find("queue", Some("small"))
            .first()
            .and_then(|q| q["backlog"].as_i64());
        for label in ["small", "big"] {
            let graphile = find("graphile", Some(label))
                .first()
                .and_then(|g| f(g, "jobs_per_s"));
            for q in find("queue", Some(label)) {
                let backlog = q["backlog"].as_i64().unwrap_or(0);
                let sample = q["sample"].as_i64().unwrap_or(0);
                let what = if sample == backlog {
                    format!(
                        "{} queued, drain all, {} worker(s) x{}",
                        count(backlog),
                        q["workers"],
                        q["concurrency"]
                    )
                } else {
                    let queued = count(q["queued_at_start"].as_i64().unwrap_or(backlog));
                    format!(
                        "{queued} queued, first {}, {} worker(s) x{}",
                        count(sample),
                        q["workers"],
                        q["concurrency"]
                    )
                };
                let berth = f(q, "tasks_per_s");
                println!(
                    "  {what:<w$} {:>9}  {:>20} {:>7}  {:>20}",
                    rate(berth),
                    rate(graphile),
                    ratio(berth, graphile),
                    ratio(berth, pgbench)
                );
            }
        }
        // The bar: no slowdown from the small backlog to the large one, per worker count.
        for q in find("queue", Some("big")) {
            let small = find("queue", Some("small"))
                .into_iter()
                .find(|s| s["workers"] == q["workers"]);
            if let Some(small) = small {
                println!(
                    "  {:<w$} {:>9}  {:>20} {:>7}",
                    format!(
                        "no-slowdown bar, {} worker(s): {} vs {}",
                        q["workers"],
                        count(q["queued_at_start"].as_i64().unwrap_or(0)),
                        count(small_n.unwrap_or(0))
                    ),
                    rate(f(q, "tasks_per_s")),
                    format!(
                        "{}: {}",
                        count(small_n.unwrap_or(0)),
                        rate(f(small, "tasks_per_s"))
                    ),
                    ratio(f(q, "tasks_per_s"), f(small, "tasks_per_s"))
                );
            }
        }
        if let Some(p) = pg {
            println!(
                "  pgbench: 1-row INSERT per transaction, {} clients, {} s, prepared: the durable single-row commit rate",
                p["clients"], p["secs"]
            );
        }
        for q in &queue {
            if q["retried_or_failed"].as_i64().unwrap_or(0) > 0 {
                println!(
                    "  WARNING: {} tasks retried or failed in the {} run",
                    q["retried_or_failed"], q["label"]
                );
            }
        }
        for g in find("graphile", None) {
            if g["mode"] == "sample" {
                println!(
                    "  note: graphile large-backlog figure = first {} of {} jobs (minus its start/stop time, as its perfTest does)",
                    g["jobs"], g["backlog"]
                );
            }
        }
    }

    let prov = find("provision", None).first().copied();
    let ddl = find("ddl", None).first().copied();
    if prov.is_some() || ddl.is_some() {
        println!();
        let n = prov.or(ddl).map(|v| v["count"].clone()).unwrap_or_default();
        println!(
            "PROVISION  `shared` plan, PUT to last_operation=succeeded, {n} sequential, idle broker, interleaved with the anchor (target <= 1.5x)"
        );
        println!(
            "  {:<w$} {:>16}  {:<48} {:>7}",
            "", "berth", "anchor: CREATE ROLE + CREATE DATABASE", "ratio"
        );
        for p in ["p50_ms", "p99_ms"] {
            row(
                &format!("latency {}", &p[..3]),
                ms(prov.and_then(|v| f(v, p))),
                ms(ddl.and_then(|v| f(v, p))),
                ratio(prov.and_then(|v| f(v, p)), ddl.and_then(|v| f(v, p))),
            );
        }
    }

    if let Some(api) = find("api", None).first() {
        println!();
        println!(
            "API  {} concurrent provision PUTs (new instance id each), {} s, wrk; API alone (no worker running)",
            api["connections"], api["secs"]
        );
        println!("  {:<w$} {:>16}  {:<48}", "", "berth", "target");
        row(
            "latency p50",
            ms(f(api, "p50_ms")),
            String::new(),
            String::new(),
        );
        row(
            "latency p99",
            ms(f(api, "p99_ms")),
            "< 20 ms".into(),
            String::new(),
        );
        row(
            "requests/s",
            rate(f(api, "rps")),
            String::new(),
            String::new(),
        );
        row(
            "requests (non-2xx, socket errors)",
            format!("{}", api["requests"]),
            format!(
                "{} non-2xx, {} socket errors",
                api["non_2xx"], api["socket_errors"]
            ),
            String::new(),
        );
        if let (Some(c), Some(rps)) = (api["connections"].as_f64(), f(api, "rps")) {
            println!(
                "  note: closed loop, so mean latency = connections / throughput = {c} / {rps:.0} = {:.1} ms",
                1000.0 * c / rps
            );
        }
        if let Some(n) = api["wal_segments_created"].as_i64() {
            println!(
                "  WAL segments created during the measured run: {n} (0: it wrote into segments recycled by the \
                 CHECKPOINT after the first run, as on a database in service)"
            );
        }
        let first = &api["first_run"];
        if first.is_object() {
            println!(
                "  first run on this database ({} s, not the target figure: new WAL segments are zero-filled inside commits): \
                 p50 {}, p99 {}, {}",
                api["warmup_secs"],
                ms(f(first, "p50_ms")),
                ms(f(first, "p99_ms")),
                rate(f(first, "rps")),
            );
        }
        row(
            "API peak RSS (VmHWM)",
            f(api, "vmhwm_kb").map_or("-".into(), |k| format!("{:.1} MB", k / 1024.0)),
            "< 50 MB".into(),
            String::new(),
        );
    }
    Ok(())
}
