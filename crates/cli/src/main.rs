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

mod at_file;
mod commands;
mod output;
mod render;

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
    /// Output format of results, as az's: json (pretty), jsonc (colored on a terminal), table, tsv.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = render::Format::Json)]
    output: render::Format,
    /// JMESPath query applied to a result before it is printed, as az's (e.g. `[].deviceId`,
    /// `[?status=='enabled'].{id:deviceId}`); see https://jmespath.org.
    #[arg(long, global = true, value_name = "JMESPATH")]
    query: Option<String>,
}

/// Where the CLI finds the service: a connection string, else the data directory's instance.json.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// DPS service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...);
    /// `--login`/`-l` as az.
    #[arg(long, short = 'l', visible_alias = "login", env = "FLEETGATE_CONNECTION_STRING", hide_env_values = true)]
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
    /// Print the instance details (ID scope, endpoints, connection strings) and whether its
    /// server answers.
    Info {
        /// Data directory of the local instance.
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
    /// Print a shell completion script: `source <(fleetgate completion bash)`, or save it where
    /// the shell loads completions from (zsh: a directory on $fpath, as `_fleetgate`).
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// mimalloc instead of glibc's malloc: see docs/architecture.md (dependencies) for the figures.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = output::configure(cli.output, cli.query) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
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
            Command::Completion { shell } => {
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "fleetgate", &mut script);
                out!("{}", String::from_utf8_lossy(&script));
                Ok(())
            }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand and option says what it is for, in its own words: clap shows a
    /// subcommand's doc comment, or else the doc comment of the type it holds, so a missing one
    /// shows another command's line.
    #[test]
    fn every_command_and_option_has_its_own_help() {
        fn walk(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
            let mut seen = std::collections::HashMap::new();
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                match sub.get_about() {
                    None => problems.push(format!("{name}: no help")),
                    Some(about) => {
                        if let Some(other) = seen.insert(about.to_string(), name.clone()) {
                            problems.push(format!("{name}: same help as {other}: {about}"));
                        }
                    }
                }
                walk(sub, &name, problems);
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    problems.push(format!("{path} --{}: no help", arg.get_long().unwrap_or(id)));
                }
            }
        }
        let mut problems = Vec::new();
        walk(&super::Cli::command(), "fleetgate", &mut problems);
        // A subcommand without a doc comment of its own shows the doc of an argument group it
        // flattens.
        let groups = [
            <super::Target as clap::Args>::augment_args(clap::Command::new("g")),
            <crate::commands::hub::HubTarget as clap::Args>::augment_args(clap::Command::new("g")),
            <crate::commands::enrollment_args::EnrollmentArgs as clap::Args>::augment_args(clap::Command::new("g")),
        ];
        fn borrowed(cmd: &clap::Command, path: &str, groups: &[String], problems: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_some_and(|a| groups.contains(&a.to_string())) {
                    problems.push(format!("{name}: shows an argument group's doc, not its own"));
                }
                borrowed(sub, &name, groups, problems);
            }
        }
        let groups: Vec<String> = groups.iter().filter_map(|g| g.get_about().map(|a| a.to_string())).collect();
        borrowed(&super::Cli::command(), "fleetgate", &groups, &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
