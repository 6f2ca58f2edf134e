//! `fleetgate`: the one binary. `serve` runs the service; the other verbs mirror `az iot dps`.

/// `println!` for command output: a closed stdout (`| head`) is a clean exit, not a panic
/// (see [`output`]).
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for command output (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*)) };
}

mod commands;
mod output;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Self-hosted device provisioning service and IoT hub, wire-compatible with Azure DPS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the CLI finds the service: a connection string, else the data directory's instance.json.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// DPS service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...).
    #[arg(long, env = "FLEETGATE_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Data directory of a local server (used when no connection string is given).
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
    pub data_dir: PathBuf,
    /// PEM file of the CA to trust for the service's certificate (default: the data dir's ca.pem).
    #[arg(long, env = "FLEETGATE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the provisioning service (MQTT/TLS and HTTPS) on the embedded default.
    Serve(commands::serve::ServeArgs),
    /// Print the instance details (ID scope, endpoints, connection strings).
    Info {
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
    },
    /// Derive a device key from an enrollment group key, as `az iot dps enrollment-group compute-device-key`.
    ComputeDeviceKey(commands::keys::ComputeArgs),
    /// Manage enrollment groups (`az iot dps enrollment-group`).
    #[command(subcommand)]
    EnrollmentGroup(commands::groups::GroupCommand),
    /// Manage individual enrollments (`az iot dps enrollment`).
    #[command(subcommand)]
    Enrollment(commands::enrollments::EnrollmentCommand),
    /// Linked hubs and their allocation settings (`az iot dps linked-hub`).
    #[command(subcommand)]
    LinkedHub(commands::linked_hubs::LinkedHubCommand),
    /// Shared access policies and their keys (`az iot dps policy` / `az iot hub policy`).
    #[command(subcommand)]
    Policy(commands::policies::PolicyCommand),
    /// The audit trail: attestation attempts, hub connections, service-side changes.
    Audit(commands::audit::AuditArgs),
    /// Inspect and delete registration records (`az iot dps enrollment-group registration`).
    #[command(subcommand)]
    Registration(commands::registrations::RegistrationCommand),
    /// Provision simulated devices of an enrollment group and send telemetry from them.
    Simulate(commands::simulate::SimulateArgs),
    /// IoT hub: linked hubs, device identities, twins, methods, C2D, monitor-events (`az iot hub`).
    #[command(subcommand)]
    Hub(commands::hub::HubCommand),
    /// Test certificates for X.509 attestation: a CA, intermediates, device certificates.
    #[command(subcommand)]
    Cert(commands::cert::CertCommand),
    /// The telemetry log: `repair` copies what is intact out of damaged segments.
    #[command(subcommand)]
    Events(commands::events::EventsCommand),
}

/// mimalloc instead of glibc's malloc: see docs/architecture.md (dependencies) for the figures.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Info { data_dir } => commands::serve::info(&data_dir).await,
            Command::ComputeDeviceKey(args) => commands::keys::run(args),
            Command::EnrollmentGroup(cmd) => commands::groups::run(cmd).await,
            Command::Registration(cmd) => commands::registrations::run(cmd).await,
            Command::Enrollment(cmd) => commands::enrollments::run(cmd).await,
            Command::LinkedHub(cmd) => commands::linked_hubs::run(cmd).await,
            Command::Policy(cmd) => commands::policies::run(cmd).await,
            Command::Audit(args) => commands::audit::run(args).await,
            Command::Simulate(args) => commands::simulate::run(args).await,
            Command::Hub(cmd) => commands::hub::run(cmd).await,
            Command::Cert(cmd) => commands::cert::run(cmd),
            Command::Events(cmd) => commands::events::run(cmd),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
