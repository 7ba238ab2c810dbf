//! `rbee queen`: the queen daemon and its local administration.
//!
//! - `rbee queen start [--foreground]`, `stop`, `status`: the queen in the background,
//!   with `queen.pid` and `queen.log` in its data directory.
//! - `rbee queen serve`: runs the queen in the foreground (for systemd, or a terminal).
//!   Creates the cluster CA in its data directory on first start. Reports
//!   `{"ready": {"link": …, "join": …}}` on stdout.
//! - `rbee queen token [--ttl-secs N]`: prints a join token for hives; `rbee queen tokens`
//!   lists the live ones by id, `rbee queen tokens revoke ID` revokes one.
//! - `rbee queen credentials --out DIR [--name NAME]`: writes a client identity under the
//!   cluster CA (for tools that talk to the queen).
//! - `rbee queen ca rotate`, `rbee queen ca retire`: rotates the cluster CA of the running
//!   queen (both CAs trusted until the previous one is retired).
//!
//! The data directory is `--data`, else `<RBEE_HOME>/queen`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use rbee::actors::hive::workers::{IdleTimeout, WorkerMode};
use rbee::actors::queen::admission::AdmissionLimits;
use rbee::actors::queen::daemon::{self, QueenConfig, RunningQueen};
use rbee::actors::queen::keys::KeyStore;
use rbee::actors::queen::tokens::TokenStore;

use super::LinkTiming;
use super::background::{self, DaemonFiles};

#[derive(Debug, Subcommand)]
pub enum QueenCommand {
    /// Start the queen in the background (pid and log files in its data directory), or
    /// with `--foreground` in this process (for systemd).
    Start {
        #[command(flatten)]
        args: ServeArgs,
        /// Stay in the foreground.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the queen started with `rbee queen start`.
    Stop {
        #[command(flatten)]
        data: DataDir,
    },
    /// Whether the queen runs, and where it listens.
    Status {
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the queen in the foreground (what `start` runs in the background).
    Serve(ServeArgs),
    /// Write a systemd unit that runs the queen with these arguments (restarted on
    /// failure, logging to the journal, confined to its data and cache), enable and start
    /// it.
    InstallService {
        #[command(flatten)]
        args: ServeArgs,
        #[command(flatten)]
        install: super::service::InstallArgs,
    },
    /// Disable, stop and delete the systemd unit `install-service` wrote.
    UninstallService {
        /// The user unit (`systemctl --user`).
        #[arg(long)]
        user: bool,
    },
    /// API keys of the HTTP gateway (stored hashed; shown once when created).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print a join token for hives.
    Token {
        #[command(flatten)]
        data: DataDir,
        /// How long the token admits hives, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// The address hives reach this queen at, for a queen that listens on all
        /// addresses (0.0.0.0): a host's IP, or a Kubernetes Service's cluster IP.
        #[arg(long)]
        advertise: Option<std::net::IpAddr>,
    },
    /// List the join tokens that have not expired (`revoke ID` revokes one).
    Tokens {
        #[command(subcommand)]
        command: Option<TokensCommand>,
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the cluster CA of the running queen.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Write a client identity (ca.crt, node.crt, node.key) under the cluster CA.
    Credentials {
        #[command(flatten)]
        data: DataDir,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// The client's node id.
        #[arg(long, default_value = "operator")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Revoke a join token: it admits no hive from now on (hives that joined with it stay;
    /// `rbee hive remove` removes one).
    Revoke {
        /// The token's id (`rbee queen tokens`).
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Start a rotation: a new CA signs every certificate from now on, both CAs are
    /// trusted, and every connected hive renews its certificates and its workers' at once.
    Rotate {
        #[command(flatten)]
        data: DataDir,
    },
    /// End the rotation: the previous CA is trusted no more. Nodes that have not renewed
    /// under the new CA (hives away since the rotation) are refused and must join again.
    Retire {
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (once).
    Create {
        #[command(flatten)]
        data: DataDir,
        /// A name to list and revoke it by.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Store a key made elsewhere (from --key-file, else `RBEE_API_KEY`, else one line of
    /// stdin; never an argument): a Kubernetes Secret's, so the API is closed from the
    /// first start. Adding a stored key again changes nothing.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// A name to list and revoke it by.
        #[arg(long, default_value = "default")]
        name: String,
        /// A file holding the key (a mounted Secret).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Revoke other keys of this name (a rotated Secret retires the old key).
        #[arg(long)]
        replace: bool,
    },
    /// List the keys (ids and names, never the keys).
    List {
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke the keys with this id or name (revoking the last one leaves the API closed).
    Revoke {
        #[command(flatten)]
        data: DataDir,
        /// An id (from `list`) or a name.
        key: String,
    },
    /// Open the API to requests without a key again (once every key is revoked).
    Open {
        #[command(flatten)]
        data: DataDir,
    },
}

fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create { data, name } => {
            let (key, stored) = KeyStore::new(&data.path()).create(&name)?;
            eprintln!(
                "rbee: key {} ({name}) created; it is shown only now",
                stored.id
            );
            println!("{key}");
        }
        KeysCommand::Add {
            data,
            name,
            key_file,
            replace,
        } => {
            let key = match (key_file, std::env::var("RBEE_API_KEY")) {
                (Some(file), _) => {
                    std::fs::read_to_string(&file).with_context(|| file.display().to_string())?
                }
                (None, Ok(key)) => key,
                (None, Err(_)) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line
                }
            };
            let stored = KeyStore::new(&data.path()).add(&name, key.trim(), replace)?;
            eprintln!("rbee: key {} ({}) stored", stored.id, stored.name);
        }
        KeysCommand::List { data, json } => {
            let keys = KeyStore::new(&data.path()).list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!("{:<10} {:<24} CREATED (unix)", "ID", "NAME");
                for k in keys {
                    println!("{:<10} {:<24} {}", k.id, k.name, k.created_at);
                }
            }
        }
        KeysCommand::Revoke { data, key } => {
            let store = KeyStore::new(&data.path());
            let n = store.revoke(&key)?;
            println!("revoked {n} key(s)");
            if store.list()?.is_empty() {
                eprintln!(
                    "rbee: no key is left: the HTTP API refuses every request until a key is \
                     created, or `rbee queen keys open` opens it to anyone who can reach it"
                );
            }
        }
        KeysCommand::Open { data } => {
            KeyStore::new(&data.path()).open()?;
            println!("the HTTP API takes requests without a key");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// The queen's data directory (default: `<RBEE_HOME>/queen`).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl DataDir {
    pub fn path(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| rbee::actors::paths::data_dir().join("queen"))
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataDir,
    /// Node link address for hives and clients.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Join address for hives that join with a token.
    #[arg(long, default_value = "127.0.0.1:7701")]
    join_listen: SocketAddr,
    /// Requests that may wait per model before new ones are refused as overloaded.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Longest a request waits for a worker, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    max_wait_ms: u64,
    /// Slots of the workers the queen starts: KV memory for that many full-context
    /// sequences (on the native engine up to 16 shorter sequences share it; on candle,
    /// sequences at once).
    #[arg(long, default_value_t = 2)]
    slots: usize,
    /// Start workers inside their hive's process instead of as processes of their own.
    #[arg(long)]
    in_process_workers: bool,
    /// Seconds a worker the queen started may idle before its hive stops it (0: never).
    #[arg(long, default_value_t = 300)]
    worker_idle_secs: u64,
    /// Address of the OpenAI-compatible HTTP API and /metrics (beyond loopback only with
    /// an API key: `rbee queen keys create`).
    #[arg(long, default_value = "127.0.0.1:7702")]
    http: SocketAddr,
    /// Serve no HTTP API.
    #[arg(long)]
    no_http: bool,
    /// Lifetime of the node certificates the queen signs, and of its own (`30d`, `12h`,
    /// `45s`; a bare number is days). Nodes renew theirs over their link once two thirds
    /// of it have passed.
    #[arg(long, default_value = "30d", value_parser = parse_lifetime)]
    cert_lifetime: Duration,
    #[command(flatten)]
    timing: LinkTiming,
}

fn report(line: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// The queen's pid and log files.
pub fn files(data: &Path) -> DaemonFiles {
    DaemonFiles::new(data, "queen")
}

pub async fn run(command: QueenCommand) -> anyhow::Result<ExitCode> {
    match command {
        QueenCommand::InstallService { args, install } => super::service::install(
            super::service::Daemon::Queen,
            super::service::daemon_args(&[]),
            None,
            vec![args.data.path()],
            &install,
        ),
        QueenCommand::UninstallService { user } => {
            super::service::uninstall(super::service::Daemon::Queen, user)
        }
        QueenCommand::Start {
            args,
            foreground: true,
        }
        | QueenCommand::Serve(args) => match serve(args).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                report(&serde_json::json!({ "failed": format!("{e:#}") }));
                Ok(ExitCode::FAILURE)
            }
        },
        QueenCommand::Start { args, .. } => {
            let files = files(&args.data.path());
            let ready = background::start(&files, &background::foreground_args())
                .context("the queen did not start")?;
            println!(
                "queen started (pid {}): link {}, join {}; log {}",
                files.running().unwrap_or_default(),
                ready["ready"]["link"].as_str().unwrap_or("?"),
                ready["ready"]["join"].as_str().unwrap_or("?"),
                files.log.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Keys(command) => keys(command),
        QueenCommand::Stop { data } => {
            match background::stop(&files(&data.path()))? {
                Some(pid) => println!("queen stopped (pid {pid})"),
                None => println!("no queen was running"),
            }
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Status { data, json } => {
            let data = data.path();
            let pid = files(&data).running();
            let addrs = daemon::last_addrs(&data).ok();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "running": pid.is_some(), "pid": pid, "addrs": addrs })
                );
            } else {
                match (pid, addrs) {
                    (Some(pid), Some(a)) => {
                        println!(
                            "queen running (pid {pid}): link {}, join {}",
                            a.link, a.join
                        )
                    }
                    (Some(pid), None) => println!("queen running (pid {pid})"),
                    (None, _) => println!("queen not running (data {})", data.display()),
                }
            }
            Ok(if pid.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(super::EXIT_UNREACHABLE)
            })
        }
        QueenCommand::Token {
            data,
            ttl_secs,
            advertise,
        } => {
            let token =
                daemon::create_token(&data.path(), Duration::from_secs(ttl_secs), advertise)?;
            println!("{token}");
            eprintln!(
                "rbee: token {} admits hives for {ttl_secs} s (`rbee queen tokens revoke {0}` \
                 revokes it)",
                TokenStore::id_of(&token.secret)
            );
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Tokens {
            command: Some(TokensCommand::Revoke { id, data }),
            ..
        } => {
            TokenStore::new(&data.path()).revoke(&id)?;
            println!("token {id} revoked: it admits no hive from now on");
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Tokens {
            command: None,
            data,
            json,
        } => {
            let tokens = TokenStore::new(&data.path()).list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<10} {:<12} {:<8} JOINED", "ID", "EXPIRES IN", "STATE");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for t in tokens {
                let state = if t.revoked { "revoked" } else { "live" };
                let left = t.expires_at.saturating_sub(now);
                let left = format!("{}h{:02}m{:02}s", left / 3600, left / 60 % 60, left % 60);
                println!(
                    "{:<10} {:<12} {:<8} {}",
                    t.id,
                    left,
                    state,
                    t.joined.join(",")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Ca(command) => change_ca(command).await,
        QueenCommand::Credentials { data, out, name } => {
            daemon::client_identity(&data.path(), &name)?.save(&out)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Rotates or retires the CA of the queen running on this machine, and says what each
/// connected hive did.
async fn change_ca(command: CaCommand) -> anyhow::Result<ExitCode> {
    let (data, retire) = match command {
        CaCommand::Rotate { data } => (data.path(), false),
        CaCommand::Retire { data } => (data.path(), true),
    };
    let addrs = daemon::last_addrs(&data)?;
    let identity = daemon::client_identity(&data, "operator")?;
    let client = rbee::Client::connect_as(identity, addrs.link)
        .await
        .with_context(|| format!("the queen at {} (is it running?)", addrs.link))?;
    let change = client.change_ca(retire).await?;
    let what = match retire {
        true => "the previous CA is retired; the CA",
        false => "rotation started; the new CA",
    };
    println!("{what} is {}", change.fingerprint);
    for (hive, renewed) in &change.renewed {
        println!("  {hive}: renewed {renewed}");
    }
    for (hive, why) in &change.failed {
        println!("  {hive}: NOT renewed: {why}");
    }
    Ok(match change.failed.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// A lifetime such as `30d`, `12h`, `90m` or `45s` (a bare number is in days).
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with d, h, m or s"))?;
    let secs = match unit {
        "" | "d" => n.checked_mul(24 * 3600),
        "h" => n.checked_mul(3600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?}: expected a number with d, h, m or s"))?;
    // Renewal starts at two thirds of the lifetime and retries every few seconds.
    if secs < 15 {
        return Err(format!("{text:?}: a certificate must live at least 15s"));
    }
    Ok(Duration::from_secs(secs))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = QueenConfig::new(&args.data.path());
    config.listen = args.listen;
    config.join_listen = args.join_listen;
    config.link = args.timing.config()?;
    config.limits = AdmissionLimits {
        max_queue: args.max_queue,
        max_wait: Duration::from_millis(args.max_wait_ms),
    };
    config.defaults.slots = args.slots.max(1);
    config.cert_lifetime = args.cert_lifetime;
    if args.in_process_workers {
        config.defaults.mode = WorkerMode::InProcess;
    }
    config.defaults.idle_timeout = match args.worker_idle_secs {
        0 => IdleTimeout::Never,
        secs => IdleTimeout::After(Duration::from_secs(secs)),
    };
    super::init_logs();
    let mut queen = RunningQueen::start(config).await?;
    let gateway = match args.no_http {
        true => None,
        false => {
            Some(rbee::gateway::start(queen.service.clone(), &args.data.path(), args.http).await?)
        }
    };
    report(&serde_json::json!({ "ready": {
        "link": queen.addrs.link.to_string(),
        "join": queen.addrs.join.to_string(),
        "http": gateway.as_ref().map(|g| g.addr.to_string()),
    }}));
    kill_actor_for_tests(&queen);
    let crashed = tokio::select! {
        _ = super::stop_requested() => false,
        _ = queen.actor_stopped() => true,
    };
    drop(gateway);
    queen.stop().await;
    if crashed {
        tracing::error!("the queen actor stopped on its own: the daemon ends");
        anyhow::bail!("the queen actor stopped on its own (see the log)");
    }
    Ok(())
}

/// Test-only fault hook: `RBEE_TEST_KILL_QUEEN_ACTOR_MS` kills the queen actor that many
/// milliseconds after start, as a crash would, so a test sees the daemon end with it.
fn kill_actor_for_tests(queen: &RunningQueen) {
    let Some(ms) = std::env::var("RBEE_TEST_KILL_QUEEN_ACTOR_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let actor = queen.queen.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        actor.kill();
    });
}
