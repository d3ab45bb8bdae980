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
        Command::Reload(a) => reload(a.socket.as_deref(), &a.config.config),
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

/// `portgate reload`: one line on stdout when applied, every problem on
/// stderr (one per line) when not.
fn reload(socket: Option<&Path>, config: &Path) -> ExitCode {
    let socket = match client::find_socket(socket, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portgate: {e}");
            return ExitCode::from(1);
        }
    };
    match client::reload(&socket) {
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
    // Validate before binding anything.
    let Some(cfg) = load(path) else { return ExitCode::from(1) };
    let log = logging::init(cfg.log.format, &cfg.log.level, cfg.log.queue_lines);
    let exit_log = log.clone();
    raise_nofile_limit();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let (tx, rx) = mpsc::channel(16);
        if let Err(e) = spawn_signal_listener(tx) {
            return Err(format!("cannot install signal handlers: {e}"));
        }
        portgate::run(cfg, log, rx).await.map_err(|e| e.to_string())
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

fn spawn_signal_listener(tx: mpsc::Sender<Signal>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Terminate,
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
