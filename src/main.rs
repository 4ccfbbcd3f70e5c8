//! The `sluice` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sluice::admin::client as admin_client;
use sluice::config::{self, Config, demo};
use sluice::{server, sim, telemetry};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Edge gateway for LLM inference",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command: the demo, with these flags.
    #[command(flatten)]
    demo: demo::DemoArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo (the default): a demo tenant over two simulated engines.
    Demo(demo::DemoArgs),
    /// Serve with a configuration file.
    Serve {
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem with its field path.
    CheckConfig { file: PathBuf },
    /// Print the SHA-256 under which an API key is stored in the config.
    HashKey { key: String },
    /// Work with policy plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run a simulated vLLM-compatible engine.
    SimEngine {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        #[command(flatten)]
        options: sim::SimOptions,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check that a file is a sluice:policy component this sluice can run.
    Validate {
        file: PathBuf,
        /// The plugin config (JSON) to describe it with.
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Upload a component as the next version of a plugin (admin API).
    Upload {
        file: PathBuf,
        /// The plugin's name in the registry. Default: the file's stem.
        #[arg(long)]
        name: Option<String>,
        /// Also add it to the end of the tenant's chain (when not in it yet).
        #[arg(long)]
        chain: bool,
        /// With --chain: the step's config (JSON object).
        #[arg(long, default_value = "{}")]
        config: String,
        /// With --chain: the step's failure policy.
        #[arg(long, value_enum, default_value = "fail-closed")]
        failure: admin_client::Failure,
        #[command(flatten)]
        target: admin_client::Target,
    },
    /// List uploaded plugins and their versions (`*` marks the active one).
    List {
        name: Option<String>,
        #[command(flatten)]
        target: admin_client::Target,
    },
    /// Make an earlier version active (default: the one before the active).
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<u32>,
        #[command(flatten)]
        target: admin_client::Target,
    },
    /// Delete a plugin and its versions (it must not be in the chain).
    Delete {
        name: String,
        #[command(flatten)]
        target: admin_client::Target,
    },
    /// Show or change the tenant's chain.
    Chain {
        #[command(subcommand)]
        command: admin_client::ChainCommand,
        #[command(flatten)]
        target: admin_client::Target,
    },
    /// Build a plugin crate (a copy of plugins/template) into a component and validate it.
    Build {
        /// The plugin crate's folder (with its Cargo.toml).
        dir: PathBuf,
        /// Where to write the component [default: DIR/<crate name>.wasm].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The plugin config (JSON) to validate it with.
        #[arg(long, default_value = "{}")]
        config: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Demo(cli.demo));
    // Serving commands export traces (config file, else OTEL_* variables).
    let otel = match &command {
        Command::Serve { config } => Config::load(config).ok().map(|c| c.telemetry),
        Command::Demo(_) | Command::SimEngine { .. } => Some(config::TelemetryConfig::default()),
        _ => None,
    }
    .and_then(|t| telemetry::otel::Settings::resolve(&t));
    let provider = match telemetry::init(otel.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            telemetry::init_logging();
            tracing::error!(error = %e, "cannot set up trace export; serving without it");
            None
        }
    };
    // The simulated engine exports its own spans, as a service of its own.
    let sim_provider = match (&command, &otel) {
        (Command::Demo(_) | Command::SimEngine { .. }, Some(s)) => {
            let mut s = s.clone();
            s.service_name = "vllm-sim".into();
            match telemetry::otel::provider(&s) {
                Ok(p) => {
                    sim::trace::install(telemetry::otel::tracer(&p));
                    Some(p)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot export the simulated engine's spans");
                    None
                }
            }
        }
        _ => None,
    };
    let code = dispatch(command);
    for p in provider.iter().chain(sim_provider.iter()) {
        telemetry::flush(p);
    }
    code
}

fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} pool(s), {} tenant(s))",
                    file.display(),
                    cfg.pools.len(),
                    cfg.tenants.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::HashKey { key } => {
            println!("{}", config::hash_key(&key));
            ExitCode::SUCCESS
        }
        Command::Demo(args) => run(run_demo(args)),
        Command::Serve { config } => run(async move {
            let cfg = Config::load(&config)?;
            serve(cfg, None).await
        }),
        Command::SimEngine { listen, options } => run(sim::run(listen, options)),
        Command::Plugin(PluginCommand::Upload {
            file,
            name,
            chain,
            config,
            failure,
            target,
        }) => run(async move {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().replace('_', "-"))
                    .ok_or_else(|| anyhow::anyhow!("pass --name"))?,
            };
            let client = admin_client::Client::connect(target).await?;
            client.upload(&file, &name, chain, &config, failure).await
        }),
        Command::Plugin(PluginCommand::List { name, target }) => run(async move {
            let client = admin_client::Client::connect(target).await?;
            client.list(name.as_deref()).await
        }),
        Command::Plugin(PluginCommand::Rollback { name, to, target }) => run(async move {
            let client = admin_client::Client::connect(target).await?;
            client.rollback(&name, to).await
        }),
        Command::Plugin(PluginCommand::Delete { name, target }) => run(async move {
            let client = admin_client::Client::connect(target).await?;
            client.delete(&name).await
        }),
        Command::Plugin(PluginCommand::Chain { command, target }) => run(async move {
            let client = admin_client::Client::connect(target).await?;
            client.chain(command).await
        }),
        Command::Plugin(PluginCommand::Validate { file, config }) => {
            match sluice::plugins::validate(&file, &config) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin(PluginCommand::Build { dir, out, config }) => {
            match sluice::plugins::toolchain::build(&dir, out.as_deref(), &config) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_demo(args: demo::DemoArgs) -> anyhow::Result<()> {
    let mut engines = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let h = sim::spawn(listener, sim::SimOptions::default()).await?;
        engines.push(h.addr);
        handles.push(h);
    }
    let dir = args.data_dir();
    let tls = server::tls::generate_self_signed(&dir)?;
    // A fresh operator key per start, from the OS's CSPRNG: it acts on every tenant.
    let mut secret = [0u8; 16];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let operator_key = format!("sk-sluice-op-{}", hex::encode(secret));
    let cfg = demo::config(
        &args,
        &tls.cert_path,
        &tls.key_path,
        &engines,
        &operator_key,
    );
    let banner = move |addrs: &server::Addresses| {
        let https = addrs.https.expect("the demo has an HTTPS listener");
        let http = addrs.http.expect("the demo has an HTTP listener");
        let ops = addrs.ops.expect("the demo has an ops listener");
        println!("sluice demo is up");
        println!(
            "  https:   https://{https}  (self-signed: {})",
            tls.cert_path.display()
        );
        println!("  http:    http://{http}");
        println!("  ops:     http://{ops}/healthz  http://{ops}/readyz  http://{ops}/metrics");
        println!(
            "  admin:   http://{ops}/admin/v1   tenant admin key: {}   operator key: {operator_key}",
            demo::DEMO_ADMIN_KEY
        );
        println!(
            "  tenant:  demo   api key: {}   model: {}",
            demo::DEMO_KEY,
            demo::DEMO_MODEL
        );
        println!(
            "  engines: {} simulated vLLM replicas: {}",
            engines.len(),
            engines
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!();
        println!("try:");
        println!(
            "  curl --cacert {} https://localhost:{}/v1/chat/completions \\\n    -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"{}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'",
            tls.cert_path.display(),
            https.port(),
            demo::DEMO_KEY,
            demo::DEMO_MODEL
        );
    };
    serve(cfg, Some(Box::new(banner))).await?;
    for h in handles {
        h.shutdown();
    }
    Ok(())
}

type Banner = Box<dyn FnOnce(&server::Addresses) + Send>;

/// Start, wait for SIGTERM or Ctrl-C, drain, return.
async fn serve(cfg: Config, banner: Option<Banner>) -> anyhow::Result<()> {
    let issues = cfg.validate();
    if !issues.is_empty() {
        let list: Vec<_> = issues.iter().map(|i| format!("  - {i}")).collect();
        anyhow::bail!("invalid configuration:\n{}", list.join("\n"));
    }
    let running = server::start(cfg).await?;
    match banner {
        Some(b) => b(&running.addrs),
        None => tracing::info!(
            http = ?running.addrs.http,
            https = ?running.addrs.https,
            ops = ?running.addrs.ops,
            "sluice is serving"
        ),
    }
    shutdown_signal().await;
    tracing::info!("shutdown requested: draining");
    running.shutdown();
    running.wait().await;
    tracing::info!("drained; bye");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
