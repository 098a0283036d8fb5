//! The `tch-serve` command: parses the command line, starts the runtime and hands over to the
//! library (`serve`, `healthcheck`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tch_serve::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tch-serve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Some(Command::Healthcheck(args)) => {
            let ok = runtime.block_on(tch_serve::healthcheck(
                args.port,
                Duration::from_secs(args.timeout_secs),
            ));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        command => {
            let config = match command {
                Some(Command::Serve(config)) => *config,
                _ => cli.serve,
            };
            // The trace exporter's batch processor runs on the runtime.
            let endpoint = tch_serve::telemetry::otlp_endpoint(config.otlp_endpoint.as_deref());
            let traced = {
                let _runtime = runtime.enter();
                tch_serve::telemetry::init_tracing(config.log_format, endpoint.as_deref())
            };
            if let Err(e) = traced {
                eprintln!("tch-serve: {e:#}");
                return ExitCode::FAILURE;
            }
            match runtime.block_on(tch_serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tch-serve: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    // The shutdown sequence is bounded already; nothing left on the runtime may hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}
