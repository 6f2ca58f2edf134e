//! The results as Markdown: the comparison table with ratios, the targets and where each
//! stands, and the details behind them. scripts/bench puts the machine description above it.

use std::fmt::Write;

use crate::scenarios::{per_op, IdleResult, StormResult, TelemetryResult};
use crate::Report;

fn num(x: f64) -> String {
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else if x >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{x:.digits$}");
    // Thousands separators on the integer part.
    let (int, frac) = s.split_once('.').map(|(i, f)| (i.to_owned(), Some(f.to_owned()))).unwrap_or((s.clone(), None));
    let mut grouped = String::new();
    for (k, c) in int.chars().enumerate() {
        if k > 0 && (int.len() - k) % 3 == 0 && c != '-' {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{grouped}.{f}"),
        None => grouped,
    }
}

/// A count, with thousands separators.
fn int(n: usize) -> String {
    num(n as f64).split('.').next().unwrap_or_default().to_owned()
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn status(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

fn find<'a, T>(
    items: &'a [T],
    server: &str,
    pick: impl Fn(&T) -> (&str, &str),
    variant: Option<&str>,
) -> Option<&'a T> {
    items.iter().find(|t| {
        let (s, v) = pick(t);
        s == server && variant.is_none_or(|want| v.starts_with(want))
    })
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let o = r.options.as_ref().expect("options recorded");
    let storm_fg = find(&r.storm, "fleetgate", |s: &StormResult| (&s.server, ""), None);
    let storm_mq = find(&r.storm, "mosquitto", |s: &StormResult| (&s.server, ""), None);
    // Each variant's median round (by rate): the rounds are interleaved to spread drift.
    let tel = |server: &str, variant: Option<&str>| {
        let mut runs: Vec<&TelemetryResult> = r
            .telemetry
            .iter()
            .filter(|t| t.server == server && variant.is_none_or(|want| t.variant.starts_with(want)))
            .collect();
        runs.sort_by(|a, b| a.per_s.total_cmp(&b.per_s));
        runs.get(runs.len() / 2).copied()
    };
    // Fleetgate's figures for the comparison come from the same client loop as Mosquitto's.
    let (tel_fg, tel_off, tel_on) = (
        tel("fleetgate", Some("durable append")),
        tel("mosquitto", Some("persistence off")),
        tel("mosquitto", Some("persistence on")),
    );
    let tel_client = tel("fleetgate", Some("fleetgate-client"));
    let idle_fg = find(&r.idle, "fleetgate", |i: &IdleResult| (&i.server, ""), None);
    let idle_mq = find(&r.idle, "mosquitto", |i: &IdleResult| (&i.server, ""), None);

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "Sizes: provisioning storm {} devices at concurrency {}; telemetry {} devices for {} s with {}-byte \
         bodies, {} interleaved rounds (the tables show each variant's median round, the details every round); {} idle connections; {} cold starts; {} TLS handshakes of each kind. The whole run took {:.0} s. \
         The load generator is one process on the same machine ({} runtime threads), so it competes with the \
         server for the same cores; server CPU is read from `/proc/<pid>/stat` of the server process only.\n",
        o.devices,
        o.concurrency,
        o.telemetry_devices,
        o.seconds,
        o.body_bytes,
        o.telemetry_rounds,
        o.idle_connections,
        o.cold_starts,
        o.handshakes,
        r.total_s,
        r.generator_threads
    );

    // How much of the machine other processes took while we measured.
    let phases: Vec<&crate::scenarios::Measured> = r
        .storm
        .iter()
        .map(|s| &s.m)
        .chain(r.telemetry.iter().map(|t| &t.m))
        .chain(r.idle.iter().map(|i| &i.m))
        .chain(r.tls_floor.iter().map(|t| &t.m))
        .collect();
    let capacity = |m: &crate::scenarios::Measured| m.wall_s * r.cores as f64;
    let (others, total) = phases.iter().fold((0.0, 0.0), |(o, t), m| (o + m.others_cpu_s, t + capacity(m)));
    if total > 0.0 && others / total > 0.1 {
        let _ = writeln!(
            md,
            "**Not a quiet machine:** other processes used {:.0}% of its CPU while these figures were measured \
             (the *others' CPU* column below). Both servers ran under the same disturbance, so the ratios hold; \
             absolute rates would be higher on an idle machine.\n",
            others / total * 100.0
        );
    }
    if let Some(asked) = r.idle_requested {
        let _ = writeln!(
            md,
            "Idle connections: {} were asked for, but the file-descriptor limit here is {} (a hard limit this \
             container cannot raise: no CAP_SYS_RESOURCE), and the server inherits it; the bench held what fits.\n",
            int(asked),
            int(r.nofile_limit as usize)
        );
    }
    let _ = writeln!(md, "### Fleetgate vs Mosquitto\n");
    let _ = writeln!(md, "| Scenario | Measure | Fleetgate | Mosquitto | Fleetgate ÷ Mosquitto |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|");
    if let Some(fg) = storm_fg {
        let mq = storm_mq;
        let m = |f: &dyn Fn(&StormResult) -> String| mq.map(f).unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| Provisioning storm ({} devices, concurrency {}) | completed per second | {} | {} | {} |",
            int(fg.devices),
            fg.concurrency,
            num(fg.per_s),
            m(&|s| num(s.per_s)),
            mq.map(|s| ratio(fg.per_s, s.per_s)).unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "| | latency p50 / p99 / max (ms) | {} / {} / {} | {} | {} (p99) |",
            num(fg.latency.p50_ms),
            num(fg.latency.p99_ms),
            num(fg.latency.max_ms),
            m(&|s| format!("{} / {} / {}", num(s.latency.p50_ms), num(s.latency.p99_ms), num(s.latency.max_ms))),
            mq.map(|s| ratio(fg.latency.p99_ms, s.latency.p99_ms)).unwrap_or_default()
        );
        let _ = writeln!(md, "| | failures | {} | {} | |", fg.failures.total(), m(&|s| s.failures.total().to_string()));
        let _ = writeln!(
            md,
            "| | server CPU per operation (ms) | {} | {} | {} |",
            num(fg.server_cpu_per_op_ms),
            m(&|s| num(s.server_cpu_per_op_ms)),
            mq.map(|s| ratio(fg.server_cpu_per_op_ms, s.server_cpu_per_op_ms)).unwrap_or_default()
        );
    }
    if let Some(fg) = tel_fg {
        let head = format!("Telemetry QoS 1 ({} devices, {} B, {} s)", int(fg.devices), fg.body_bytes, fg.seconds);
        for (k, mq) in [("persistence off", tel_off), ("persistence on", tel_on)] {
            let Some(mq) = mq else { continue };
            let first = if k == "persistence off" { head.as_str() } else { "" };
            let _ = writeln!(
                md,
                "| {first} | messages acknowledged per second (Mosquitto {k}) | {} | {} | {} |",
                num(fg.per_s),
                num(mq.per_s),
                ratio(fg.per_s, mq.per_s)
            );
        }
        if tel_off.is_none() && tel_on.is_none() {
            let _ = writeln!(md, "| {head} | messages acknowledged per second | {} | – | |", num(fg.per_s));
        }
        let ref_mq = tel_off.or(tel_on);
        let _ = writeln!(
            md,
            "| | ack latency p50 / p99 (ms) | {} / {} | {} | {} (p99) |",
            num(fg.latency.p50_ms),
            num(fg.latency.p99_ms),
            ref_mq
                .map(|m| format!("{} / {} (persistence off)", num(m.latency.p50_ms), num(m.latency.p99_ms)))
                .unwrap_or_else(|| "–".into()),
            ref_mq.map(|m| ratio(fg.latency.p99_ms, m.latency.p99_ms)).unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "| | server CPU per message (µs) | {} | {} | {} |",
            num(fg.server_cpu_per_msg_us),
            ref_mq.map(|m| format!("{} (persistence off)", num(m.server_cpu_per_msg_us))).unwrap_or_else(|| "–".into()),
            ref_mq.map(|m| ratio(fg.server_cpu_per_msg_us, m.server_cpu_per_msg_us)).unwrap_or_default()
        );
        let gen = |t: &TelemetryResult| per_op(t.m.generator_cpu_s * 1e6, t.acked);
        let _ = writeln!(
            md,
            "| | generator CPU per message (µs) | {} | {} | |",
            num(gen(fg)),
            ref_mq.map(|m| format!("{} (persistence off)", num(gen(m)))).unwrap_or_else(|| "–".into()),
        );
        if let Some(c) = tel_client {
            let _ = writeln!(
                md,
                "| | with the project's device client (`HubClient`): messages per second; generator CPU per message (µs) | {}; {} | | {} (rate) |",
                num(c.per_s),
                num(gen(c)),
                ref_mq.map(|m| ratio(c.per_s, m.per_s)).unwrap_or_default()
            );
        }
    }
    if let Some(fg) = idle_fg {
        let mq = idle_mq;
        let _ = writeln!(
            md,
            "| Idle TLS connections ({}) | connections held (answered a ping afterwards) | {} ({}) | {} | |",
            int(fg.target),
            int(fg.connected),
            int(fg.alive),
            mq.map(|m| format!("{} ({})", int(m.connected), int(m.alive))).unwrap_or_else(|| "–".into())
        );
        let _ = writeln!(
            md,
            "| | server RSS per connection (KiB) | {} | {} | {} |",
            num(fg.rss_per_connection_kib),
            mq.map(|m| num(m.rss_per_connection_kib)).unwrap_or_else(|| "–".into()),
            mq.map(|m| ratio(fg.rss_per_connection_kib, m.rss_per_connection_kib)).unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "| | connects per second; server CPU per connect (ms) | {}; {} | {} | {} (CPU) |",
            num(fg.connects_per_s),
            num(fg.server_cpu_per_connect_ms),
            mq.map(|m| format!("{}; {}", num(m.connects_per_s), num(m.server_cpu_per_connect_ms)))
                .unwrap_or_else(|| "–".into()),
            mq.map(|m| ratio(fg.server_cpu_per_connect_ms, m.server_cpu_per_connect_ms)).unwrap_or_default()
        );
    }
    if let Some(c) = &r.cold_start {
        let _ = writeln!(
            md,
            "| Cold start ({} registrations stored) | spawn → first accepted registration, median / max (ms) | {} / {} | – | |",
            int(c.registrations_in_store),
            num(c.median_ms),
            num(c.max_ms)
        );
    }
    if let Some(t) = &r.tls_floor {
        let _ = writeln!(
            md,
            "| TLS floor (Fleetgate's rustls configuration, no MQTT) | server CPU per full handshake (ms) | {} | | |",
            num(t.server_cpu_per_handshake_ms)
        );
        let _ = writeln!(
            md,
            "| | server CPU per handshake with session resumption offered (ms; {} of {} resumed) | {} | | |",
            int(t.resumed),
            int(t.resumed_attempts),
            num(t.server_cpu_per_resumption_attempt_ms)
        );
    }

    let _ = writeln!(md, "\n### Targets (issue 6)\n");
    let _ = writeln!(md, "| Target | Measured | Status |");
    let _ = writeln!(md, "|---|---|---|");
    if let Some(fg) = storm_fg {
        if let Some(mq) = storm_mq.filter(|m| m.per_s > 0.0) {
            let x = fg.per_s / mq.per_s;
            let _ = writeln!(
                md,
                "| provision-storm ≥ 1.0× Mosquitto's connect/publish cycle rate | {:.2}× ({} vs {} per s) | {} |",
                x,
                num(fg.per_s),
                num(mq.per_s),
                status(x >= 1.0)
            );
        }
        let _ = writeln!(
            md,
            "| provision-storm ≥ 2,000 registrations/s over TLS | {} /s | {} |",
            num(fg.per_s),
            status(fg.per_s >= 2000.0)
        );
        let _ = writeln!(
            md,
            "| provision-storm p99 ≤ 100 ms at concurrency 500 | {} ms at concurrency {} | {} |",
            num(fg.latency.p99_ms),
            fg.concurrency,
            if fg.concurrency == 500 { status(fg.latency.p99_ms <= 100.0) } else { "not measured at 500" }
        );
        let _ = writeln!(
            md,
            "| provision-storm zero failures | {} | {} |",
            fg.failures.total(),
            status(fg.failures.total() == 0)
        );
        if let Some(t) = r.tls_floor.as_ref().filter(|t| t.server_cpu_per_handshake_ms > 0.0) {
            let x = fg.server_cpu_per_op_ms / t.server_cpu_per_handshake_ms;
            let _ = writeln!(
                md,
                "| server CPU per registration ≤ 1.5× a bare TLS handshake | {:.2}× ({} ms vs {} ms) | {} |",
                x,
                num(fg.server_cpu_per_op_ms),
                num(t.server_cpu_per_handshake_ms),
                status(x <= 1.5)
            );
        }
    }
    if let Some(fg) = tel_fg {
        for (k, mq) in [("persistence off", tel_off), ("persistence on", tel_on)] {
            if let Some(mq) = mq.filter(|m| m.per_s > 0.0) {
                let x = fg.per_s / mq.per_s;
                let _ = writeln!(
                    md,
                    "| telemetry ≥ 1.0× Mosquitto's QoS 1 rate ({k}), appending durably | {:.2}× ({} vs {} msg/s) | {} |",
                    x,
                    num(fg.per_s),
                    num(mq.per_s),
                    status(x >= 1.0)
                );
            }
        }
    }
    if let Some(fg) = idle_fg {
        let _ = writeln!(
            md,
            "| idle ≤ 16 KiB server memory per TLS connection | {} KiB | {} |",
            num(fg.rss_per_connection_kib),
            status(fg.rss_per_connection_kib <= 16.0)
        );
        if let Some(mq) = idle_mq {
            let _ = writeln!(
                md,
                "| idle below Mosquitto's memory per connection | {} vs {} KiB | {} |",
                num(fg.rss_per_connection_kib),
                num(mq.rss_per_connection_kib),
                status(fg.rss_per_connection_kib < mq.rss_per_connection_kib)
            );
        }
    }
    if let Some(c) = &r.cold_start {
        let _ = writeln!(
            md,
            "| cold start ≤ 200 ms | median {} ms, max {} ms | {} |",
            num(c.median_ms),
            num(c.max_ms),
            status(c.max_ms <= 200.0)
        );
    }

    let _ = writeln!(md, "\n### Details\n");
    let _ = writeln!(
        md,
        "Server CPU is the server process's; generator CPU this bench's; *others* is what every other process \
         on the machine used meanwhile (on a quiet machine, about zero: larger values mean the figures are \
         pessimistic). Listen overflows count connection attempts the kernel dropped because the server's \
         accept queue was full (the client retries the SYN after 1 s, then 3 s, ...).\n"
    );
    let _ = writeln!(
        md,
        "| Run | Wall (s) | Server CPU (s) | Generator CPU (s) | Others' CPU (s) | Listen overflows | Server RSS at end / peak (MiB) | Failures by reason |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
    let row = |md: &mut String, what: String, m: &crate::scenarios::Measured, rss: String, failures: String| {
        let _ = writeln!(
            md,
            "| {what} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {rss} | {failures} |",
            m.wall_s, m.server_cpu_s, m.generator_cpu_s, m.others_cpu_s, m.listen_overflows
        );
    };
    let mib = |k: u64| format!("{:.0}", k as f64 / 1024.0);
    if let Some(t) = &r.tls_floor {
        row(
            &mut md,
            format!(
                "tls-floor, {} full handshakes at concurrency {} ({:.0}/s; latency p50 {} ms, p99 {} ms)",
                t.ok,
                t.concurrency,
                t.per_s,
                num(t.latency.p50_ms),
                num(t.latency.p99_ms)
            ),
            &t.m,
            "–".into(),
            t.failures.describe(),
        );
    }
    for s in &r.storm {
        row(
            &mut md,
            format!("storm, {} ({})", s.server, s.operation),
            &s.m,
            format!("{} / {}", mib(s.server_rss_kib), mib(s.server_peak_rss_kib)),
            s.failures.describe(),
        );
    }
    for t in &r.telemetry {
        row(
            &mut md,
            format!(
                "telemetry round {}, {} ({}; {} of {} devices connected)",
                t.round, t.server, t.variant, t.connected, t.devices
            ),
            &t.m,
            format!("{} / –", mib(t.server_rss_kib)),
            t.failures.describe(),
        );
    }
    for i in &r.idle {
        row(
            &mut md,
            format!(
                "idle, {} (connecting {} from {} source address(es); RSS {:.1} → {:.1} MiB; generator RSS {} MiB)",
                i.server,
                i.connected,
                i.source_addresses,
                i.rss_before_kib as f64 / 1024.0,
                i.rss_after_kib as f64 / 1024.0,
                mib(i.generator_rss_kib)
            ),
            &i.m,
            format!("{} / {}", mib(i.rss_after_kib), mib(i.server_peak_rss_kib)),
            i.failures.describe(),
        );
    }
    if let Some(c) = &r.cold_start {
        let runs: Vec<String> = c.runs_ms.iter().map(|m| num(*m)).collect();
        let _ = writeln!(md, "\nCold start runs (ms): {}.", runs.join(", "));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(20000.0), "20,000");
        assert_eq!(num(1234.567), "1,235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(0.12345), "0.123");
        assert_eq!(ratio(1.0, 2.0), "0.50×");
        assert_eq!(ratio(1.0, 0.0), "–");
    }
}
