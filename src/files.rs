//! The edges where truesize touches the file system on a user's behalf.
//!
//! Reading: every text file a user names (configs, indexes, reference JSON) is opened without
//! blocking (a FIFO must not hang the tool), must be a regular file, and is read up to a cap
//! chosen per kind of file; `/dev/zero` or a 2 GB file is refused from its metadata before a
//! byte is read.
//!
//! Writing: output files are written to a fresh temporary name in the destination folder
//! (created exclusively, so an existing link there is never followed) and renamed over the
//! destination: a symlink planted at the destination is replaced, its target never written, and
//! a reader never sees half a file. Temporary files are registered so that SIGINT, SIGTERM or
//! SIGHUP removes them before the process exits (see [`install_signal_cleanup`]).

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest config file read (`config.json` or truesize TOML). Real configs are a few KiB; Phi-3's
/// long-context one, with its two 48-entry factor lists, is under 8 KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Largest JSON side file read (a reference's `expected.json` holds one number per parameter
/// tensor: a few hundred KiB for the largest real models).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// What kind of file system object a path is, for messages about the wrong kind.
pub fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Read a regular file of at most `cap` bytes. `what` names the kind of file in messages.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO for reading blocks until a writer appears; O_NONBLOCK returns at once,
        // and the metadata of the open file (not of the path: no race) says what it is.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::file(path, format!("cannot read {what}: {e}")))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot stat {what}: {e}")))?;
    if !meta.is_file() {
        return Err(Error::file(
            path,
            format!("{what} must be a regular file, but this is {}", kind(&meta)),
        ));
    }
    if meta.len() > cap {
        return Err(Error::file(
            path,
            format!(
                "{what} is {} bytes, more than any real one (limit {cap} bytes)",
                meta.len()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // The file may grow between stat and read: never read past the cap.
    f.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::file(path, format!("cannot read {what}: {e}")))?;
    if buf.len() as u64 > cap {
        return Err(Error::file(
            path,
            format!("{what} grew past the limit of {cap} bytes while being read"),
        ));
    }
    Ok(buf)
}

/// [`read_capped`] as UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64, what: &str) -> Result<String> {
    let bytes = read_capped(path, cap, what)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::file(
            path,
            format!(
                "{what} is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Temporary files removed on signals

static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn temp_files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a list of paths, still valid: keep using it.
    TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove(p: &Path) {
    if std::fs::remove_file(p).is_err() {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// A temporary file or folder that is removed when dropped, and by the signal handler if the
/// process is interrupted while it exists.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Register `path` (not yet created) for removal.
    pub fn register(path: PathBuf) -> TempFile {
        temp_files().push(path.clone());
        TempFile { path }
    }

    /// A new folder only this user can enter, in `parent`: files written inside it by code that
    /// opens paths plainly (candle's `VarMap::save`) cannot be redirected by a link planted in
    /// a shared folder such as /tmp.
    pub fn private_dir(parent: &Path) -> Result<TempFile> {
        use std::os::unix::fs::DirBuilderExt;
        loop {
            let guard = TempFile::register(temp_name(parent, "dir"));
            match std::fs::DirBuilder::new().mode(0o700).create(guard.path()) {
                Ok(()) => return Ok(guard),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Not ours: forget it without removing it, and try the next name.
                    temp_files().retain(|p| p != guard.path());
                    std::mem::forget(guard);
                }
                Err(e) => {
                    let why = format!("cannot create a temporary folder: {e}");
                    temp_files().retain(|p| p != guard.path());
                    std::mem::forget(guard);
                    return Err(Error::file(parent, why));
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the file: it is no longer temporary (renamed into place by the caller).
    fn keep(self) {
        temp_files().retain(|p| p != &self.path);
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        remove(&self.path);
        temp_files().retain(|p| p != &self.path);
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove the registered temporary files, then exit with
/// 128 + the signal number, as a shell reports a process killed by that signal.
pub fn install_signal_cleanup() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        // Without the handler the tool still works; only the cleanup on a signal is lost.
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                for p in temp_files().iter() {
                    remove(p);
                }
                std::process::exit(128 + sig);
            }
        });
    drop(spawned);
}

/// A name in `dir` for a temporary sibling of `name`, unique to this process and call.
pub fn temp_name(dir: &Path, name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{name}.truesize-{}-{n}.tmp", std::process::id()))
}

/// Write `bytes` to `dir/name` without ever writing through a link: a fresh temporary file in
/// `dir` (created exclusively) is written, synced and renamed over `dir/name`.
pub fn write_replacing(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let dest = dir.join(name);
    let tmp = TempFile::register(temp_name(dir, name));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp.path())
        .map_err(|e| Error::file(&dest, format!("cannot create: {e}")))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::file(&dest, format!("cannot write: {e}")))?;
    drop(f);
    std::fs::rename(tmp.path(), &dest)
        .map_err(|e| Error::file(&dest, format!("cannot move into place: {e}")))?;
    tmp.keep();
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let e = read_capped(Path::new("/dev/zero"), 1 << 20, "config").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = read_capped(d.path(), 1 << 20, "config").unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_capped(&fifo, 1 << 20, "config").unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn refuses_files_over_the_cap_before_reading() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.json");
        std::fs::write(&p, vec![b' '; 1001]).unwrap();
        let e = read_capped(&p, 1000, "config").unwrap_err();
        assert!(e.to_string().contains("1001 bytes"), "{e}");
        assert_eq!(read_capped(&p, 1001, "config").unwrap().len(), 1001);
    }

    #[test]
    fn writes_replace_a_planted_symlink_not_its_target() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim.txt");
        std::fs::write(&victim, "keep me").unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("sweep.csv")).unwrap();
        write_replacing(&out, "sweep.csv", b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(
            std::fs::read_to_string(out.join("sweep.csv")).unwrap(),
            "new"
        );
        assert!(!std::fs::symlink_metadata(out.join("sweep.csv"))
            .unwrap()
            .file_type()
            .is_symlink());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }
}
