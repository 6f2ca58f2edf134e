//! `fleetgate-bench`: the load generator of issue 6. It starts the servers it measures (the
//! Fleetgate release binary on a temporary data directory, Mosquitto with a generated TLS and
//! password configuration, a bare TLS endpoint), drives them over loopback from this one
//! process, reads their CPU and memory from /proc, and stops them at the end.
//!
//! ```text
//! fleetgate-bench all [--smoke] [--json F] [--markdown F]   everything, as scripts/bench runs it
//! fleetgate-bench provision-storm | telemetry | idle | cold-start | tls-floor
//! ```

mod report;
mod scenarios;
mod servers;
mod tls;
mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::Serialize;

use scenarios::device_id;
use servers::{FleetgateInstance, MosquittoFiles, Server};

#[derive(Parser)]
#[command(name = "fleetgate-bench", about = "Fleetgate benchmarks, side by side with Mosquitto")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario, Fleetgate and Mosquitto (what scripts/bench runs).
    All(Options),
    /// N full DPS registrations at concurrency C; Mosquitto: connect/subscribe/publish/receive/disconnect cycles.
    ProvisionStorm(Options),
    /// D connected devices sending QoS 1 telemetry for T seconds.
    Telemetry(Options),
    /// K idle TLS device connections held open: server memory per connection.
    Idle(Options),
    /// Time from `fleetgate serve` to the first accepted registration, on an existing data dir.
    ColdStart(Options),
    /// Server CPU per bare TLS handshake with Fleetgate's rustls configuration.
    TlsFloor(Options),
    /// (internal) The bare TLS endpoint tls-floor measures, run as a child process.
    #[command(hide = true)]
    TlsServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(clap::Args, Clone, Serialize)]
struct Options {
    /// Tiny sizes for every scenario (a few seconds in all); for CI, never for figures.
    #[arg(long)]
    smoke: bool,
    /// provision-storm: devices registered.
    #[arg(long, default_value_t = 20_000)]
    devices: usize,
    /// provision-storm: devices registering at the same time.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// telemetry: devices connected and sending.
    #[arg(long, default_value_t = 1_000)]
    telemetry_devices: usize,
    /// telemetry: seconds of sending.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// telemetry: body size in bytes.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// telemetry: rounds, each running every server variant once, interleaved (rates on a shared
    /// machine drift by ±10% between runs); the report takes each variant's median round.
    #[arg(long, default_value_t = 3)]
    telemetry_rounds: usize,
    /// idle: connections held open.
    #[arg(long, default_value_t = 20_000)]
    idle_connections: usize,
    /// idle: connections per loopback source address; beyond it, 127.0.0.2, .3, ... are bound
    /// before connecting (one address has about 28,000 ephemeral ports).
    #[arg(long, default_value_t = scenarios::PER_SOURCE_ADDRESS)]
    per_source_address: usize,
    /// cold-start: restarts measured.
    #[arg(long, default_value_t = 5)]
    cold_starts: usize,
    /// tls-floor: handshakes measured (each kind).
    #[arg(long, default_value_t = 5_000)]
    handshakes: usize,
    /// Seconds allowed for one registration or one Mosquitto cycle.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Measure Fleetgate only.
    #[arg(long)]
    skip_mosquitto: bool,
    /// The fleetgate binary (default: `fleetgate` beside this binary, as `cargo build --release` puts it).
    #[arg(long)]
    #[serde(skip)]
    fleetgate_bin: Option<PathBuf>,
    #[arg(long, default_value = "mosquitto")]
    #[serde(skip)]
    mosquitto_bin: String,
    #[arg(long, default_value = "mosquitto_passwd")]
    #[serde(skip)]
    mosquitto_passwd_bin: String,
    /// Directory for data directories, configurations and logs (default: a temporary one, removed at the end).
    #[arg(long)]
    #[serde(skip)]
    work_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    #[serde(skip)]
    json: Option<PathBuf>,
    /// Write the results as Markdown (the body of docs/benchmarks.md) here.
    #[arg(long)]
    #[serde(skip)]
    markdown: Option<PathBuf>,
}

impl Options {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.devices = 40;
            self.concurrency = 8;
            self.telemetry_devices = 8;
            self.seconds = 1.0;
            self.telemetry_rounds = 1;
            self.idle_connections = 40;
            self.per_source_address = 16; // exercises binding source addresses
            self.cold_starts = 1;
            self.handshakes = 40;
        }
    }
}

/// Which scenarios a command runs.
#[derive(Clone, Copy, Default)]
struct Plan {
    tls_floor: bool,
    storm: bool,
    cold_start: bool,
    telemetry: bool,
    idle: bool,
}

#[derive(Serialize, Default)]
pub struct Report {
    options: Option<Options>,
    started_unix: u64,
    total_s: f64,
    generator_threads: usize,
    /// CPUs of the machine.
    cores: usize,
    nofile_limit: u64,
    /// Idle connections asked for, when the descriptor limit allowed fewer.
    idle_requested: Option<usize>,
    tls_floor: Option<scenarios::TlsFloorResult>,
    storm: Vec<scenarios::StormResult>,
    cold_start: Option<scenarios::ColdStartResult>,
    telemetry: Vec<scenarios::TelemetryResult>,
    idle: Vec<scenarios::IdleResult>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (plan, mut opts) = match cli.command {
        Command::TlsServer { listen, cert, key } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(tls::serve_handshakes(listen, &cert, &key));
        }
        Command::All(o) => (Plan { tls_floor: true, storm: true, cold_start: true, telemetry: true, idle: true }, o),
        Command::ProvisionStorm(o) => (Plan { storm: true, ..Plan::default() }, o),
        Command::Telemetry(o) => (Plan { telemetry: true, ..Plan::default() }, o),
        Command::Idle(o) => (Plan { idle: true, ..Plan::default() }, o),
        Command::ColdStart(o) => (Plan { cold_start: true, ..Plan::default() }, o),
        Command::TlsFloor(o) => (Plan { tls_floor: true, ..Plan::default() }, o),
    };
    opts.apply_smoke();
    // Every idle connection is a descriptor here and in the server (which inherits the limit).
    let want = (opts.idle_connections.max(opts.concurrency) as u64) * 2 + 4096;
    let nofile = util::raise_nofile(want);
    let mut requested_idle = None;
    let headroom = 1_000; // listeners, database files, the other scenarios' stragglers
                          // The server keeps a larger share of the same limit for its store: it admits no more than
                          // this (more would wait in its backlog and time out here).
    let server_cap = fleetgate_server::fd_limit::connection_cap(usize::MAX, Some(nofile));
    let fits = (nofile as usize).saturating_sub(headroom).min(server_cap);
    if fits < opts.idle_connections {
        // Without CAP_SYS_RESOURCE the hard limit cannot be raised; the server (which inherits
        // it) could not hold more anyway.
        let fit = fits.max(1);
        eprintln!(
            "warning: RLIMIT_NOFILE is {nofile} (hard limit): idle holds {fit} connections instead of {}",
            opts.idle_connections
        );
        requested_idle = Some(opts.idle_connections);
        opts.idle_connections = fit;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut report = rt.block_on(run(plan, opts.clone(), nofile))?;
    report.idle_requested = requested_idle;
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| path.display().to_string())?;
    }
    if let Some(path) = &opts.markdown {
        std::fs::write(path, report::markdown(&report)).with_context(|| path.display().to_string())?;
    }
    let failed: usize = report.storm.iter().map(|s| s.failures.total()).sum::<usize>()
        + report.telemetry.iter().map(|t| t.failures.total()).sum::<usize>()
        + report.idle.iter().map(|i| i.failures.total()).sum::<usize>()
        + report.tls_floor.as_ref().map_or(0, |t| t.failures.total());
    if failed > 0 {
        bail!("{failed} operation(s) failed (see the failures above)");
    }
    Ok(())
}

struct Ctx {
    opts: Options,
    work: PathBuf,
    fleetgate_bin: PathBuf,
    /// The data directory every Fleetgate run shares, once made.
    instance: Option<FleetgateInstance>,
    /// Devices 0..provisioned are registered (and so exist in the hub).
    provisioned: usize,
    mosquitto: Option<MosquittoFiles>,
    mosquitto_users: usize,
}

impl Ctx {
    fn log(&self) -> PathBuf {
        self.work.join("fleetgate.log")
    }

    /// Starts Fleetgate on the shared data directory (creating it and the enrollment group first).
    async fn fleetgate(&mut self) -> anyhow::Result<Server> {
        let data_dir = self.work.join("fleetgate-data");
        let mut server = servers::spawn_fleetgate(&self.fleetgate_bin, &data_dir, &self.log())?;
        server.wait_listening(Duration::from_secs(30)).await?;
        if self.instance.is_none() {
            if data_dir.join("bench-group-key").exists() {
                // A --work-dir from an earlier run: its group and devices are still there.
                self.instance = Some(servers::instance(&data_dir)?);
                self.provisioned = std::fs::read_to_string(data_dir.join("bench-provisioned"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
            } else {
                self.instance = Some(servers::create_group(&data_dir).await?);
            }
        }
        Ok(server)
    }

    /// Devices 0..n are registered.
    fn set_provisioned(&mut self, n: usize) {
        self.provisioned = n;
        let _ = std::fs::write(self.work.join("fleetgate-data").join("bench-provisioned"), n.to_string());
    }

    fn instance(&self) -> &FleetgateInstance {
        self.instance.as_ref().expect("fleetgate started first")
    }

    /// Registers devices up to `n` (unmeasured).
    async fn provision_up_to(&mut self, server: &Server, n: usize) -> anyhow::Result<()> {
        if n > self.provisioned {
            println!("  (provisioning devices {}..{n} first)", self.provisioned);
            scenarios::provision(server, self.instance(), self.provisioned..n).await?;
            self.set_provisioned(n);
        }
        Ok(())
    }

    async fn mosquitto(&mut self, persistence: bool) -> anyhow::Result<Server> {
        if self.mosquitto.is_none() {
            let key = self.instance().group_key.clone();
            let users = (0..self.mosquitto_users).map(|i| (device_id(i), scenarios::mosquitto_password(&key, i)));
            self.mosquitto =
                Some(servers::prepare_mosquitto(&self.work.join("mosquitto"), &self.opts.mosquitto_passwd_bin, users)?);
        }
        let files = self.mosquitto.as_mut().expect("just made");
        let mut server = servers::spawn_mosquitto(&self.opts.mosquitto_bin, files, persistence)?;
        server.wait_listening(Duration::from_secs(30)).await?;
        Ok(server)
    }

    fn mosquitto_files(&self) -> &MosquittoFiles {
        self.mosquitto.as_ref().expect("mosquitto started first")
    }
}

fn default_fleetgate_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("fleetgate")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("target/release/fleetgate"))
}

async fn run(plan: Plan, opts: Options, nofile: u64) -> anyhow::Result<Report> {
    let started = Instant::now();
    let temp;
    let work = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("fleetgate-bench-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let fleetgate_bin = opts.fleetgate_bin.clone().unwrap_or_else(default_fleetgate_bin);
    if !fleetgate_bin.exists() {
        bail!(
            "no fleetgate binary at {} (cargo build --release -p fleetgate, or --fleetgate-bin)",
            fleetgate_bin.display()
        );
    }
    let mut mosquitto_users = 0;
    if plan.storm {
        mosquitto_users = mosquitto_users.max(opts.devices);
    }
    if plan.telemetry {
        mosquitto_users = mosquitto_users.max(opts.telemetry_devices);
    }
    if plan.idle {
        mosquitto_users = mosquitto_users.max(opts.idle_connections);
    }
    let mut ctx = Ctx {
        opts: opts.clone(),
        work: work.clone(),
        fleetgate_bin,
        instance: None,
        provisioned: 0,
        mosquitto: None,
        mosquitto_users,
    };
    let mut report = Report {
        options: Some(opts.clone()),
        started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        generator_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        nofile_limit: nofile,
        ..Report::default()
    };
    let o = &opts;
    let timeout = Duration::from_secs(o.timeout);
    println!("work directory: {}", work.display());

    if plan.tls_floor {
        println!("== tls-floor: {} bare TLS handshakes", o.handshakes);
        let r = scenarios::tls_floor(&work.join("tls-floor"), o.handshakes, 50).await?;
        println!(
            "  {:.0} handshakes/s, server CPU {:.3} ms per full handshake; resumed {}/{}: {:.3} ms each; failures: {}",
            r.per_s,
            r.server_cpu_per_handshake_ms,
            r.resumed,
            r.resumed_attempts,
            r.server_cpu_per_resumption_attempt_ms,
            r.failures.describe()
        );
        report.tls_floor = Some(r);
    }

    if plan.storm {
        println!("== provision-storm: {} devices, concurrency {}", o.devices, o.concurrency);
        let server = ctx.fleetgate().await?;
        let r = scenarios::storm_fleetgate(&server, ctx.instance(), 0..o.devices, o.concurrency, timeout).await?;
        print_storm(&r);
        // With failures we do not know which devices exist: later scenarios register them again.
        ctx.set_provisioned(if r.failures.total() == 0 { o.devices.max(ctx.provisioned) } else { 0 });
        report.storm.push(r);
        server.stop().await;
        if !o.skip_mosquitto {
            let server = ctx.mosquitto(false).await?;
            let r = scenarios::storm_mosquitto(
                &server,
                ctx.mosquitto_files(),
                &ctx.instance().group_key,
                0..o.devices,
                o.concurrency,
                timeout,
            )
            .await?;
            print_storm(&r);
            report.storm.push(r);
            server.stop().await;
        }
    }

    if plan.cold_start {
        if ctx.instance.is_none() || ctx.provisioned == 0 {
            let server = ctx.fleetgate().await?;
            let n = o.devices.min(1_000);
            ctx.provision_up_to(&server, n).await?;
            server.stop().await;
        }
        println!(
            "== cold-start: {} restarts on a data directory with {} registrations",
            o.cold_starts, ctx.provisioned
        );
        let r = scenarios::cold_start(&ctx.fleetgate_bin, ctx.instance(), &ctx.log(), ctx.provisioned, o.cold_starts)
            .await?;
        println!("  first accepted registration after {:.1} ms (median), {:.1} ms (max)", r.median_ms, r.max_ms);
        report.cold_start = Some(r);
    }

    if plan.telemetry {
        let d = o.telemetry_devices;
        let rounds = o.telemetry_rounds.max(1);
        println!("== telemetry: {d} devices, QoS 1, {} B bodies, {} s, {rounds} round(s)", o.body_bytes, o.seconds);
        for round in 1..=rounds {
            let server = ctx.fleetgate().await?;
            ctx.provision_up_to(&server, d).await?;
            let login = scenarios::Login::Fleetgate(ctx.instance().clone());
            let mut r =
                scenarios::telemetry_mqtt(&server, &login, "durable append", 0..d, o.seconds, o.body_bytes).await?;
            r.round = round;
            print_telemetry(&r);
            report.telemetry.push(r);
            if round == 1 {
                // The same load through the project's device client (its own task per connection).
                let r = scenarios::telemetry_fleetgate(&server, ctx.instance(), 0..d, o.seconds, o.body_bytes).await?;
                print_telemetry(&r);
                report.telemetry.push(r);
            }
            server.stop().await;
            if !o.skip_mosquitto {
                for (persistence, variant) in [(false, "persistence off"), (true, "persistence on, autosave 1 s")] {
                    let server = ctx.mosquitto(persistence).await?;
                    let login = scenarios::Login::Mosquitto(
                        ctx.instance().group_key.clone(),
                        ctx.mosquitto_files().ca_pem.clone(),
                    );
                    let mut r =
                        scenarios::telemetry_mqtt(&server, &login, variant, 0..d, o.seconds, o.body_bytes).await?;
                    r.round = round;
                    print_telemetry(&r);
                    report.telemetry.push(r);
                    server.stop().await;
                }
            }
        }
    }

    if plan.idle {
        let k = o.idle_connections;
        println!("== idle: {k} TLS device connections");
        let settle = Duration::from_secs(if o.smoke { 0 } else { 2 });
        let per_source = o.per_source_address;
        {
            let server = ctx.fleetgate().await?;
            ctx.provision_up_to(&server, k).await?;
            server.stop().await;
        }
        // A fresh process, so the memory measured is the connections' and not the provisioning's.
        let server = ctx.fleetgate().await?;
        let r = scenarios::idle(&server, scenarios::Login::Fleetgate(ctx.instance().clone()), k, per_source, settle)
            .await?;
        print_idle(&r);
        report.idle.push(r);
        server.stop().await;
        if !o.skip_mosquitto {
            let server = ctx.mosquitto(false).await?;
            let login =
                scenarios::Login::Mosquitto(ctx.instance().group_key.clone(), ctx.mosquitto_files().ca_pem.clone());
            let r = scenarios::idle(&server, login, k, per_source, settle).await?;
            print_idle(&r);
            report.idle.push(r);
            server.stop().await;
        }
    }

    report.total_s = started.elapsed().as_secs_f64();
    println!("done in {:.1} s", report.total_s);
    Ok(report)
}

fn print_storm(r: &scenarios::StormResult) {
    println!(
        "  {:10} {} ok in {:.1} s: {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; server CPU {:.3} ms/op; others' CPU {:.1} s; failures: {}",
        r.server,
        r.ok,
        r.m.wall_s,
        r.per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.latency.max_ms,
        r.server_cpu_per_op_ms,
        r.m.others_cpu_s,
        r.failures.describe()
    );
}

fn print_telemetry(r: &scenarios::TelemetryResult) {
    println!(
        "  {:10} ({}, round {}) {} acked in {:.1} s: {:.0} msg/s; ack p50 {:.1} ms, p99 {:.1} ms; server CPU {:.1} µs/msg, generator {:.1}; others' CPU {:.1} s; failures: {}",
        r.server,
        r.variant,
        r.round,
        r.acked,
        r.m.wall_s,
        r.per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.server_cpu_per_msg_us,
        scenarios::per_op(r.m.generator_cpu_s * 1e6, r.acked),
        r.m.others_cpu_s,
        r.failures.describe()
    );
}

fn print_idle(r: &scenarios::IdleResult) {
    println!(
        "  {:10} {}/{} connected ({} alive after), {:.0} connects/s; RSS {} → {} KiB: {:.1} KiB per connection; failures: {}",
        r.server,
        r.connected,
        r.target,
        r.alive,
        r.connects_per_s,
        r.rss_before_kib,
        r.rss_after_kib,
        r.rss_per_connection_kib,
        r.failures.describe()
    );
}
