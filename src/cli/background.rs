//! Daemons in the background: `rbee queen start` and `rbee hive start` run the same
//! command in the foreground (`serve`) as a detached process in its own process group,
//! with its output in a log file and its pid in a pid file, and return once it reported
//! ready (or failed). `stop` interrupts it (a hive then stops its workers) and waits.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a daemon may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon may take to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon's pid and log files (`<dir>/<name>.pid`, `<dir>/<name>.log`).
pub struct DaemonFiles {
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl DaemonFiles {
    pub fn new(dir: &Path, name: &str) -> Self {
        DaemonFiles {
            pid: dir.join(format!("{name}.pid")),
            log: dir.join(format!("{name}.log")),
        }
    }

    /// The pid of the running daemon, if its pid file names a live `rbee` process.
    pub fn running(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pid)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        // A recycled pid belongs to some other program.
        let program = cmdline.split(|b| *b == 0).next()?;
        let name = Path::new(std::str::from_utf8(program).ok()?).file_name()?;
        (name == "rbee").then_some(pid)
    }
}

/// The arguments this process was started with, `start` replaced by `serve` and
/// `--foreground` left out: the same daemon, in the foreground.
pub fn foreground_args() -> Vec<OsString> {
    let mut replaced = false;
    std::env::args_os()
        .skip(1)
        .filter(|a| a != "--foreground")
        .map(|a| {
            if !replaced && a == "start" {
                replaced = true;
                OsString::from("serve")
            } else {
                a
            }
        })
        .collect()
}

/// Starts `rbee ARGS` detached and waits for its report line; returns the report.
pub fn start(files: &DaemonFiles, args: &[OsString]) -> anyhow::Result<serde_json::Value> {
    if let Some(pid) = files.running() {
        anyhow::bail!(
            "already running (pid {pid}); its log is {}",
            files.log.display()
        );
    }
    if let Some(dir) = files.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .with_context(|| files.log.display().to_string())?;
    let offset = log.seek(SeekFrom::End(0))?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the daemon")?;
    std::fs::write(&files.pid, child.id().to_string())
        .with_context(|| files.pid.display().to_string())?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(report) = report_after(&files.log, offset)? {
            if report.get("ready").is_some() {
                return Ok(report);
            }
            let _ = child.wait();
            let _ = std::fs::remove_file(&files.pid);
            anyhow::bail!("{}", report["failed"].as_str().unwrap_or("failed"));
        }
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_file(&files.pid);
            anyhow::bail!(
                "exited ({status}) before it was ready; see {}",
                files.log.display()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not ready within {READY_TIMEOUT:?}; see {}",
            files.log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first report line (`{"ready": …}` or `{"failed": …}`) written after `offset`.
fn report_after(log: &Path, offset: u64) -> anyhow::Result<Option<serde_json::Value>> {
    let mut file = std::fs::File::open(log)?;
    file.seek(SeekFrom::Start(offset))?;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
            && (value.get("ready").is_some() || value.get("failed").is_some())
        {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// Interrupts the daemon and waits until it is gone; its pid, or `None` if none ran.
pub fn stop(files: &DaemonFiles) -> anyhow::Result<Option<u32>> {
    let Some(pid) = files.running() else {
        let _ = std::fs::remove_file(&files.pid);
        return Ok(None);
    };
    signal(pid, libc::SIGINT);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive(pid) {
        if Instant::now() >= deadline {
            signal(pid, libc::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&files.pid);
    Ok(Some(pid))
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: a plain signal to a process this user started (checked by `running`).
    unsafe { libc::kill(pid as i32, signal) };
}

/// Whether `pid` runs (a zombie child of someone else counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}
