//! The `chunkstream` binary: parse, set up logging and signals, run, exit.
//!
//! Exit codes: 0 success (including a clean drain), 1 a runtime failure or a
//! drain that hit SHUTDOWN_TIMEOUT, 2 invalid configuration (the message names
//! the variable), 130 a second interrupt during a drain.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;

use chunkstream::config::{Cli, Command, Config, S3Config, parse_log_format, parse_log_level};
use chunkstream::daemon::{self, RunOutcome};
use chunkstream::error::AppError;
use chunkstream::metadata::KeyLayout;
use chunkstream::store::redis::LeaseHolder;
use chunkstream::store::{CheckpointStore, RedisStore, S3Store};
use chunkstream::{client, dry_run, inventory, logging, restore};

fn main() -> ExitCode {
    // rust-s3 and ureq both bring rustls; without an explicit provider the
    // first HTTPS request panics.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(AppError::Config(err)) => {
            eprintln!("chunkstream: configuration error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            log::error!("{err}");
            eprintln!("chunkstream: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, AppError> {
    let level = parse_log_level(&cli.settings.log_level)?;
    let format = parse_log_format(&cli.settings.log_format)?;
    let url_or_default = |url: Option<String>| {
        url.unwrap_or_else(|| client::default_url(&cli.settings.metrics_addr))
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = Config::from_settings(&cli.settings)?;
            logging::init(level, format);
            let stop = install_signal_handler()?;
            match daemon::run(config, stop)? {
                RunOutcome::Drained => Ok(ExitCode::SUCCESS),
                RunOutcome::DrainTimedOut(_) => Ok(ExitCode::FAILURE),
            }
        }
        Command::Scan => {
            let config = Config::from_settings(&cli.settings)?;
            logging::init(level, format);
            let holder = LeaseHolder {
                owner: format!("scan-{}", std::process::id()),
                ttl: config.lease.ttl,
            };
            let done = match RedisStore::connect(&config.redis, config.sentinel.as_ref(), holder)
                .and_then(|mut redis| redis.load_streams())
            {
                Ok(streams) => dry_run::completed(&streams),
                Err(err) => {
                    println!("Redis not reachable ({err}): completed files cannot be told apart");
                    Default::default()
                }
            };
            let entries = dry_run::plan(&config.watch_dir, &config.rules, &done);
            for entry in &entries {
                println!("{entry}");
            }
            let count = |wanted: fn(&dry_run::Verdict) -> bool| {
                entries
                    .iter()
                    .filter(|entry| wanted(&entry.verdict))
                    .count()
            };
            println!(
                "{} to upload, {} done, {} skipped",
                count(|v| *v == dry_run::Verdict::Upload),
                count(|v| *v == dry_run::Verdict::Done),
                count(|v| matches!(v, dry_run::Verdict::Skip(_)))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            stream_id,
            output,
            from_assembled,
        } => {
            let s3 = S3Config::from_settings(&cli.settings)?;
            logging::init(level, format);
            let restored = restore::restore(&s3, &stream_id, &output, from_assembled)?;
            println!(
                "restored {stream_id} to {}: {} bytes in {} chunks, sha256 {}",
                output.display(),
                restored.bytes,
                restored.chunks,
                restored.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::List { json } => {
            let s3 = S3Config::from_settings(&cli.settings)?;
            logging::init(level, format);
            let store = S3Store::new(&s3)?;
            let streams = inventory::all_metadata(&store, &s3.prefix)?;
            if json {
                let summaries: Vec<inventory::StreamSummary> =
                    streams.iter().map(inventory::StreamSummary::from).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summaries).expect("serializable")
                );
            } else {
                print!("{}", inventory::render_list(&streams));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            stream_id,
            all,
            deep,
        } => {
            let s3 = S3Config::from_settings(&cli.settings)?;
            logging::init(level, format);
            let store = S3Store::new(&s3)?;
            let layout = KeyLayout::new(&s3.prefix);
            let ids: Vec<String> = if all {
                inventory::all_metadata(&store, &s3.prefix)?
                    .into_iter()
                    .map(|meta| meta.stream_id)
                    .collect()
            } else {
                stream_id.into_iter().collect()
            };
            let mut problems = 0;
            for id in &ids {
                for problem in inventory::verify_stream(&store, &layout, id, deep) {
                    println!("{problem}");
                    problems += 1;
                }
            }
            let depth = if deep { "deep" } else { "shallow" };
            if problems == 0 {
                println!("verified {} streams ({depth}): all good", ids.len());
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "verified {} streams ({depth}): {problems} problems",
                    ids.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Status { url, json, watch } => {
            client::status(&url_or_default(url), json, watch)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => Ok(if client::healthcheck(&url_or_default(url)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
    }
}

/// SIGINT/SIGTERM/SIGHUP: the first asks for a drain, a second exits at once.
fn install_signal_handler() -> Result<crossbeam_channel::Receiver<()>, AppError> {
    static SIGNALS: AtomicUsize = AtomicUsize::new(0);
    let (tx, rx) = crossbeam_channel::bounded(1);
    ctrlc::set_handler(move || {
        if SIGNALS.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("chunkstream: second signal; exiting now without draining");
            std::process::exit(130);
        }
        let _ = tx.try_send(());
    })
    .map_err(|err| AppError::Startup(format!("cannot install signal handler: {err}")))?;
    Ok(rx)
}
