//! The durable-write primitives: replace a file atomically (no reader ever sees a torn
//! one) and durably, and delete one durably. The store and the token sinks write through
//! them; what the files hold and who may write them is the callers' business.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::Zeroize;

/// Names of the temp files `write_atomically` creates next to its target.
const TEMP_PREFIX: &str = ".tokend-";
const TEMP_SUFFIX: &str = ".tmp";

/// temp file in the same directory → write → fdatasync → rename over the target → fsync
/// the directory. A crash at any point leaves either the old or the new file, never a
/// torn one, and the call returns only once the new one is durable.
pub(crate) fn write_atomically(
    dir: &Path,
    target: &Path,
    mut bytes: Vec<u8>,
    mode: u32,
) -> io::Result<()> {
    let result = (|| {
        // Created with O_CREAT | O_EXCL under a random name, which never follows a link
        // (open fails on one), and renamed over `target`, which replaces a link there
        // rather than writing through it: nothing here writes where a link points.
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)?;
        // Exactly `mode`, whatever the umask took away at creation.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
        tmp.write_all(&bytes)?;
        // fdatasync suffices: for a new file it writes the data and the metadata needed
        // to read it back (size, block map), i.e. everything the rename below exposes.
        // What it may skip is timestamps and the mode set above; a lost mode change
        // leaves the creation mode (0600 less the umask), never a wider one, and the
        // journal commit of the directory fsync below carries it on ext4 and XFS anyway.
        tmp.as_file().sync_data()?;
        tmp.persist(target).map_err(|e| e.error)?;
        sync_dir(dir)
    })();
    bytes.zeroize();
    result
}

/// Makes the directory's entries durable: a rename into it, a deletion from it.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deletes `path` (absent is fine) and makes the deletion durable.
pub(super) fn remove_file_durably(dir: &Path, path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `name` is that of a temp file `write_atomically` creates (and renames over
/// its target once written).
pub(super) fn is_temp_file(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_with_exactly_its_mode_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("token");
        write_atomically(tmp.path(), &target, b"one".to_vec(), 0o600).unwrap();
        write_atomically(tmp.path(), &target, b"two".to_vec(), 0o644).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let mode = fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["token"]);
        remove_file_durably(tmp.path(), &target).unwrap();
        // Already gone is not an error.
        remove_file_durably(tmp.path(), &target).unwrap();
        assert!(!target.exists());
    }
}
