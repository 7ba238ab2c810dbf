//! Fault injection for tests: a panic where a model loads or generates, on the thread
//! doing the work, as a bug in a model's code would. In-process tests mark a model path
//! (parallel tests cannot trip each other); a worker process panics where
//! `RBEE_TEST_WORKER_FAULT` (`load` or `generate`) says, whatever its model, so tests
//! with real processes can inject one through the hive
//! ([`crate::hive::process::ProcessConfig::worker_env`]).
use std::path::Path;
use std::sync::OnceLock;

/// Where to panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Load,
    Generate,
}

/// The variable a worker process reads its fault from.
pub const ENV: &str = "RBEE_TEST_WORKER_FAULT";

fn from_env() -> Option<Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    *FAULT.get_or_init(|| match std::env::var(ENV).ok()?.as_str() {
        "load" => Some(Fault::Load),
        "generate" => Some(Fault::Generate),
        _ => None,
    })
}

#[cfg(test)]
static MARKED: std::sync::Mutex<Vec<(std::path::PathBuf, Fault)>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
pub fn inject(model: &Path, fault: Fault) {
    let mut marked = MARKED.lock().unwrap_or_else(|e| e.into_inner());
    marked.push((model.to_path_buf(), fault));
}

#[cfg(test)]
fn marked(model: Option<&Path>, fault: Fault) -> bool {
    let marked = MARKED.lock().unwrap_or_else(|e| e.into_inner());
    model.is_some_and(|model| marked.iter().any(|(m, f)| m == model && *f == fault))
}

#[cfg(not(test))]
fn marked(_: Option<&Path>, _: Fault) -> bool {
    false
}

/// Panics when this process or `model` was marked for `fault`.
pub fn at(model: Option<&Path>, fault: Fault) {
    if from_env() == Some(fault) || marked(model, fault) {
        panic!("injected fault: {fault:?}");
    }
}
