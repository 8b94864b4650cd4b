//! The `tally` binary: parses the command line and dispatches to `serve` or a client
//! command. Exit codes: 0 success, 1 error (printed as `error: ...` on stderr), 2 usage
//! error (clap's own).

/// mimalloc: the request path allocates small, short-lived objects on several threads,
/// where glibc's malloc spent ~17% of server time under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use clap::Parser as _;
use tally_server::cli::{Cli, Command, ServeArgs};
use tally_server::config::{Environment, LogFormat, ServeConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        command => tally_server::client::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let env = Environment::capture();
    let cfg = ServeConfig::load(args, &env)?;
    tally_server::logging::init(env.get("RUST_LOG").as_deref());
    if cfg.log_format == LogFormat::Json {
        tracing::warn!("log_format=json is not built into this binary; logging text");
    }
    cfg.validate_security()?;
    tracing::debug!(config = ?cfg, "resolved configuration");
    tally_server::serve::run(cfg)
}
