//! `portgate`: parse arguments, call the library, map the result to an exit
//! code (0 success, 1 invalid config or runtime failure, 2 usage error).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use portgate::cli::{self, Cli, Command};
use portgate::config::{self, Config, ConfigError};
use portgate::control::client;
use portgate::ssh_config::{self, SshOptions};
use portgate::{logging, Signal};
use tokio::sync::mpsc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Run(a) => run(&a.config),
        Command::Check(a) => match load(&a.config) {
            Some(cfg) => {
                for w in cli::check_warnings(&cfg, std::time::SystemTime::now()) {
                    eprintln!("{w}");
                }
                print!("{}", cli::check_summary(&cfg));
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Routes(a) => match load(&a.config) {
            Some(cfg) => {
                print!("{}", cli::routes_table(&cfg));
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Reload(a) => match control_socket(&a.control) {
            Some(socket) => reload(&socket),
            None => ExitCode::from(1),
        },
        Command::Sessions(a) => match control_socket(&a.control) {
            Some(socket) => sessions(&socket, &filter(a.filter), a.json),
            None => ExitCode::from(1),
        },
        Command::Upgrade(a) => match control_socket(&a.control) {
            Some(socket) => match client::upgrade(&socket) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(lines) => {
                    for l in &lines {
                        eprintln!("{l}");
                    }
                    ExitCode::from(1)
                }
            },
            None => ExitCode::from(1),
        },
        Command::Close(a) => match control_socket(&a.control) {
            Some(socket) => close(&socket, a.id.as_deref(), &filter(a.filter)),
            None => ExitCode::from(1),
        },
        Command::SshConfig(a) => {
            let Some(cfg) = load(&a.config.config) else { return ExitCode::from(1) };
            let opts = SshOptions { host: a.host, user: a.user, identity_file: a.identity_file };
            let text = match ssh_config::render(&cfg, &opts) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("portgate: {e}");
                    return ExitCode::from(1);
                }
            };
            match a.output {
                None => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Some(path) => match write_atomically(&path, &text) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("portgate: cannot write {}: {e}", path.display());
                        ExitCode::from(1)
                    }
                },
            }
        }
    }
}

/// Load a config; on failure print one line per problem and return None.
fn load(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok(c) => Some(c),
        Err(ConfigError { problems }) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!(
                "portgate: {} problem{} in {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                path.display()
            );
            None
        }
    }
}

/// The control socket a command talks to; `None` (said on stderr) if none.
fn control_socket(a: &cli::ControlArgs) -> Option<std::path::PathBuf> {
    match client::find_socket(a.socket.as_deref(), &a.config.config) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("portgate: {e}");
            None
        }
    }
}

fn filter(f: cli::FilterArgs) -> client::SessionFilter {
    client::SessionFilter { route: f.route, tenant: f.tenant, client: f.client }
}

/// `portgate sessions`: a table (or the JSON array) on stdout.
fn sessions(socket: &Path, filter: &client::SessionFilter, json: bool) -> ExitCode {
    match client::sessions(socket, filter) {
        Ok(list) if json => {
            println!("{}", serde_json::Value::Array(list));
            ExitCode::SUCCESS
        }
        Ok(list) => {
            print!("{}", client::sessions_table(&list));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// `portgate close`: what was closed on stdout (as the `sessions` table);
/// exit 1 for an unknown id, 0 with a note on stderr for a filter that
/// matched nothing.
fn close(socket: &Path, id: Option<&str>, filter: &client::SessionFilter) -> ExitCode {
    let closed = match id {
        Some(id) => match client::close_id(socket, id) {
            Ok(Some(s)) => vec![s],
            Ok(None) => {
                eprintln!("portgate: no running session {id:?} (see portgate sessions)");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        None => match client::close_matching(socket, filter) {
            Ok(list) => list,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
    };
    if closed.is_empty() {
        eprintln!("portgate: no running session matched {}; nothing closed", filter.describe());
    } else {
        print!("{}", client::sessions_table(&closed));
    }
    ExitCode::SUCCESS
}

/// `portgate reload`: one line on stdout when applied, every problem on
/// stderr (one per line) when not.
fn reload(socket: &Path) -> ExitCode {
    match client::reload(socket) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(lines) => {
            for l in &lines {
                eprintln!("{l}");
            }
            ExitCode::from(1)
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// At exit, how long queued log lines get to reach a slow sink.
const LOG_FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_millis(500);

fn run(path: &Path) -> ExitCode {
    portgate::sys::limit_heap_arenas();
    // Validate before binding anything.
    let Some(cfg) = load(path) else { return ExitCode::from(1) };
    let log = logging::init(cfg.log.format, &cfg.log.level, cfg.log.queue_lines);
    let exit_log = log.clone();
    raise_nofile_limit();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .on_thread_park(logging::on_worker_park)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let handover = match handover_channel() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("portgate: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let (tx, rx) = mpsc::channel(16);
        if let Err(e) = spawn_signal_listener(tx) {
            return Err(format!("cannot install signal handlers: {e}"));
        }
        portgate::run(cfg, log, rx, handover).await.map_err(|e| e.to_string())
    });
    // Sessions' sockets are closed by now; don't wait for stray tasks.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    if let Err(e) = &result {
        tracing::error!(error = %e, "portgate failed");
    }
    // Let the log writer catch up, but never let a stalled sink hold the exit.
    exit_log.flush(LOG_FLUSH_AT_EXIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portgate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Started by a running node to take over from it (upgrade in place): the
/// handover channel is standard input.
fn handover_channel() -> Result<Option<std::os::fd::OwnedFd>, String> {
    use std::os::fd::AsFd;
    if std::env::var_os(portgate::upgrade::HANDOVER_ENV).is_none() {
        return Ok(None);
    }
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot take the handover channel (standard input): {e}"))?;
    Ok(Some(fd))
}

fn spawn_signal_listener(tx: mpsc::Sender<Signal>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Terminate,
                _ = usr2.recv() => Signal::Upgrade,
            };
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Raise the soft descriptor limit to the hard one: every session costs two
/// descriptors, and the default soft limit (1024) is far too low for a node.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum || (lim.current.is_some() && lim.maximum.is_none()) {
        let old = lim.current;
        lim.current = lim.maximum;
        if setrlimit(Resource::Nofile, lim).is_ok() {
            tracing::debug!(from = ?old, to = ?lim.current, "raised the descriptor limit");
        }
    }
}
