//! llama.cpp built from the sources vendored in the `llama-cpp-python` source
//! distribution, for side-by-side benchmarks (`rbee bench engine --against-llama-cpp`).
//! Built once with the machine's native CPU flags and kept under the target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// The source distribution whose `vendor/llama.cpp` is built.
const SDIST: &str = "llama-cpp-python==0.3.36";
const SDIST_DIR: &str = "llama_cpp_python-0.3.36";

/// Where the build lives: `RBEE_LLAMA_CPP_DIR`, else `llama-cpp` in the target directory
/// this binary was built into.
fn root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("RBEE_LLAMA_CPP_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot find the target directory of this binary")?;
    Ok(target.join("llama-cpp"))
}

fn run(what: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("llama.cpp: {what}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// The path of llama.cpp's `tool` (`llama-bench`, `llama-server`), built on first use.
pub fn tool(tool: &str) -> anyhow::Result<PathBuf> {
    let root = root()?;
    let binary = root.join("build").join("bin").join(tool);
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&root)?;
    let python = std::env::var("RBEE_PYTHON").unwrap_or_else(|_| "python3".into());
    let sources = root.join(SDIST_DIR).join("vendor").join("llama.cpp");
    if !sources.join("CMakeLists.txt").is_file() {
        run(
            "installing cmake, ninja and scikit-build-core (pip)",
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "cmake",
                "ninja",
                "scikit-build-core",
            ]),
        )?;
        run(
            &format!("downloading the {SDIST} source distribution (pip)"),
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args([
                    "--no-deps",
                    "--no-build-isolation",
                    "--no-binary=llama-cpp-python",
                ])
                .arg(SDIST)
                .arg("-d")
                .arg(&root),
        )?;
        run(
            "unpacking",
            Command::new("tar")
                .arg("xzf")
                .arg(root.join(format!("{SDIST_DIR}.tar.gz")))
                .arg("-C")
                .arg(&root),
        )?;
    }
    let build = root.join("build");
    run(
        "configuring (cmake, native CPU flags)",
        Command::new("cmake")
            .arg("-S")
            .arg(&sources)
            .arg("-B")
            .arg(&build)
            .args([
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
            ])
            .args(["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"])
            .args(["-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]),
    )?;
    run(
        &format!("building {tool} (about 15 minutes on 2 cores)"),
        Command::new("ninja").arg("-C").arg(&build).arg(tool),
    )?;
    anyhow::ensure!(binary.is_file(), "the build made no {}", binary.display());
    Ok(binary)
}

/// The CPU as `lscpu` names it and the SIMD flags that pick kernels, for every table.
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let simd: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| {
            [
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512_vnni",
                "avx_vnni",
            ]
            .contains(f)
        })
        .collect();
    format!(
        "cpu {} | {} cores | {}",
        field("model name"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        simd.join(" ")
    )
}
