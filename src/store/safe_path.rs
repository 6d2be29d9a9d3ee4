//! Reaching the state directory without following what another user could have planted
//! (a walk from `/` that checks each component's owner and its directory's mode), and
//! opening the files inside it without following a symbolic link.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::StoreError;

/// Links followed in one walk before giving up, as the kernel does (ELOOP).
const MAX_LINKS: usize = 40;

/// Why a path to the state directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathProblem {
    #[error(
        "{link} is a symbolic link owned by uid {owner}, neither root nor this process (uid {me}): another user could point it anywhere; set state.dir to the real directory, or remove the link"
    )]
    ForeignLink { link: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path} in {parent}, a directory anyone can write (sticky), belongs to uid {owner}, neither root nor this process (uid {me}): that user could replace it; remove it, or pick a directory of this user's"
    )]
    ForeignEntry {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
        me: u32,
    },
    #[error(
        "{dir} is writable by other users (mode {mode:o}) and has no sticky bit, so anyone could swap {next} for a link; pick a state directory whose parents only root and this user can write"
    )]
    OpenDir {
        dir: PathBuf,
        mode: u32,
        next: PathBuf,
    },
    #[error(
        "{dir} belongs to uid {owner}, neither root nor this process (uid {me}): that user could swap {next} for a link; pick a state directory whose parents belong to root or this user"
    )]
    ForeignDir {
        dir: PathBuf,
        owner: u32,
        me: u32,
        next: PathBuf,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("more than {MAX_LINKS} symbolic links on the way to it")]
    TooManyLinks,
    #[error(
        "{path} is a symbolic link: tokend never follows a link inside its state directory; remove it"
    )]
    LinkInside { path: PathBuf },
}

/// Opens the state directory `dir` (creating its missing components, mode 0700, when
/// `create`), one component at a time from `/`, never through something another user
/// could have planted. The rule, for each name looked up in a directory D:
///
/// - D belongs to root or to this uid, and is not writable by group or others unless it
///   has the sticky bit (then only an entry's owner may rename or delete it);
/// - a symbolic link is followed only when it belongs to root or to this uid: nobody
///   else can then change where it points (a link's target is fixed at creation), nor,
///   by the rule on D, replace it;
/// - in a sticky directory writable by others (`/tmp`), the entry must also belong to
///   root or to this uid: anyone else's entry there is theirs to swap.
///
/// So `/var/run → /run` or a `/tmp` that is a link of root's still work, while a link
/// planted by another user, or any path through a directory that user can write, is
/// refused with the component named. Once the walk passes, every component can change
/// only by root's or this uid's hand, so the paths below it stay what was checked. ACLs
/// are not read: a directory opened to others by an ACL alone is not seen.
///
/// The directory itself is not held to the rule (the caller checks its owner and mode)
/// unless it sits in a sticky directory open to others.
pub(super) fn open_dir(dir: &Path, create: bool) -> Result<OwnedFd, StoreError> {
    let refuse = |problem| StoreError::UnsafePath {
        dir: dir.to_path_buf(),
        problem,
    };
    let fail = |at: &Path, e: Errno| StoreError::Dir {
        dir: dir.to_path_buf(),
        source: io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", at.display())),
    };
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        // getcwd names the real directory: no link to check on the way there.
        let cwd = std::env::current_dir().map_err(|source| StoreError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        cwd.join(dir)
    };
    let me = rustix::process::geteuid().as_raw();
    let root = Path::new("/");
    let open_path = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = rustix::fs::open(root, open_path, Mode::empty()).map_err(|e| fail(root, e))?;
    let root_stat = rustix::fs::fstat(&root_fd).map_err(|e| fail(root, e))?;
    // The directories walked so far, the last the current one: `..` pops.
    let mut stack = vec![(root_fd, root.to_path_buf(), root_stat)];
    let mut todo = components(&absolute);
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let (parent, at, parent_stat) = stack.last().expect("the root is never popped");
        let here = at.join(&name);
        guards_entries(parent_stat, at, &here, me).map_err(refuse)?;
        let stat = match rustix::fs::statat(parent, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(parent, name.as_os_str(), Mode::from_raw_mode(0o700)) {
                    // Made (or raced by another's): looked at again like any entry.
                    Ok(()) | Err(Errno::EXIST) => todo.push(name),
                    Err(e) => return Err(fail(&here, e)),
                }
                continue;
            }
            Err(e) => return Err(fail(&here, e)),
        };
        let kind = FileType::from_raw_mode(stat.st_mode);
        entry_owned_safely(&stat, parent_stat, at, &here, me).map_err(refuse)?;
        match kind {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(refuse(PathProblem::TooManyLinks));
                }
                let target = rustix::fs::readlinkat(parent, name.as_os_str(), Vec::new())
                    .map_err(|e| fail(&here, e))?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.truncate(1);
                }
                todo.extend(components(target));
            }
            FileType::Directory => {
                // Swapped since the look (by root or us): the fd's own stat is what counts.
                let fd = rustix::fs::openat(parent, name.as_os_str(), open_path, Mode::empty())
                    .map_err(|e| fail(&here, e))?;
                let stat = rustix::fs::fstat(&fd).map_err(|e| fail(&here, e))?;
                entry_owned_safely(&stat, parent_stat, at, &here, me).map_err(refuse)?;
                stack.push((fd, here, stat));
            }
            _ => return Err(refuse(PathProblem::NotADirectory { path: here })),
        }
    }
    let (last, at, _) = stack.pop().expect("the root is never popped");
    rustix::fs::openat(
        &last,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(&at, e))
}

/// Whether a name looked up in the directory `dir` (stat `st`) can be trusted to stay
/// what it is: see [`open_dir`]. `next` is that name's path, for the message.
fn guards_entries(st: &Stat, dir: &Path, next: &Path, me: u32) -> Result<(), PathProblem> {
    let (dir, next) = (dir.to_path_buf(), next.to_path_buf());
    if !trusted(st.st_uid, me) {
        return Err(PathProblem::ForeignDir {
            dir,
            owner: st.st_uid,
            me,
            next,
        });
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        return Err(PathProblem::OpenDir {
            dir,
            mode: st.st_mode & 0o7777,
            next,
        });
    }
    Ok(())
}

/// Whether the entry `path` (stat `st`) of the directory `dir` (stat `dir_st`) is owned
/// so that no one else can repoint or replace it: see [`open_dir`].
fn entry_owned_safely(
    st: &Stat,
    dir_st: &Stat,
    dir: &Path,
    path: &Path,
    me: u32,
) -> Result<(), PathProblem> {
    if trusted(st.st_uid, me) {
        return Ok(());
    }
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(PathProblem::ForeignLink {
            link: path.to_path_buf(),
            owner: st.st_uid,
            me,
        });
    }
    // Writable by others, so sticky (checked before the look): only the owner's to swap.
    if dir_st.st_mode & 0o022 != 0 {
        return Err(PathProblem::ForeignEntry {
            path: path.to_path_buf(),
            parent: dir.to_path_buf(),
            owner: st.st_uid,
            me,
        });
    }
    Ok(())
}

fn trusted(uid: u32, me: u32) -> bool {
    uid == 0 || uid == me
}

/// The names of `path` to walk, last first (a stack); `.` dropped, `..` kept.
fn components(path: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    names.reverse();
    names
}

/// Opens a file in the state directory with `options`, refusing (never following) a
/// symbolic link there: the directory was checked, but not what a link in it points at.
pub(super) fn open_no_follow(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let flags = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    options
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| link_refused(e, path))
}

/// The whole file at `path`, read without following a symbolic link.
pub(super) fn read_no_follow(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_no_follow(OpenOptions::new().read(true), path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// O_NOFOLLOW's ELOOP ("too many levels of symbolic links") said plainly.
pub(super) fn link_refused(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) {
        io::Error::new(
            e.kind(),
            PathProblem::LinkInside {
                path: path.to_path_buf(),
            }
            .to_string(),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    use super::*;

    fn refusal(dir: &Path) -> PathProblem {
        match open_dir(dir, true) {
            Err(StoreError::UnsafePath { problem, .. }) => problem,
            Err(e) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("{} was accepted", dir.display()),
        }
    }

    fn same_dir(fd: &OwnedFd, path: &Path) -> bool {
        let (a, b) = (rustix::fs::fstat(fd).unwrap(), fs::metadata(path).unwrap());
        a.st_ino == b.ino() && a.st_dev == b.dev()
    }

    #[test]
    fn links_of_this_user_are_followed_and_missing_parts_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        symlink("real", tmp.path().join("rel")).unwrap();
        symlink(&real, tmp.path().join("abs")).unwrap();
        symlink("real/../real/.", tmp.path().join("dots")).unwrap();
        for via in ["rel", "abs", "dots"] {
            let fd = open_dir(&tmp.path().join(via), false).unwrap();
            assert!(same_dir(&fd, &real), "{via}");
        }
        let fd = open_dir(&tmp.path().join("abs/a/b"), true).unwrap();
        assert!(same_dir(&fd, &real.join("a/b")));
        for made in [real.join("a"), real.join("a/b")] {
            assert_eq!(fs::metadata(&made).unwrap().mode() & 0o777, 0o700);
        }
    }

    #[test]
    fn a_parent_writable_by_others_without_the_sticky_bit_is_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let problem = refusal(&open.join("state"));
        assert!(
            matches!(&problem, PathProblem::OpenDir { dir, mode: 0o777, .. } if *dir == open),
            "{problem}"
        );
        assert!(problem.to_string().contains("sticky"), "{problem}");
        assert!(!open.join("state").exists());
        // With the sticky bit, this user's entries there are safe from the others.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        open_dir(&open.join("state"), true).unwrap();
    }

    #[test]
    fn files_loops_and_links_inside_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("file"), b"").unwrap();
        let problem = refusal(&tmp.path().join("file/state"));
        assert!(
            matches!(problem, PathProblem::NotADirectory { .. }),
            "{problem}"
        );
        symlink("loop", tmp.path().join("loop")).unwrap();
        let problem = refusal(&tmp.path().join("loop"));
        assert!(matches!(problem, PathProblem::TooManyLinks), "{problem}");

        let target = tmp.path().join("target");
        fs::write(&target, b"keep").unwrap();
        symlink(&target, tmp.path().join("link")).unwrap();
        let err = open_no_follow(
            OpenOptions::new().write(true).truncate(true),
            &tmp.path().join("link"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        let err = read_no_follow(&tmp.path().join("link")).unwrap_err();
        assert!(err.to_string().contains("link"), "{err}");
        let missing = read_no_follow(&tmp.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn links_and_dirs_of_another_user_are_refused_when_root() {
        let me = rustix::process::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        if std::os::unix::fs::lchown(&link, Some(me + 4242), None).is_err() {
            eprintln!("skipped: changing a link's owner needs root");
            return;
        }
        let problem = refusal(&link);
        assert!(
            matches!(&problem, PathProblem::ForeignLink { link: l, owner, .. } if *l == link && *owner == me + 4242),
            "{problem}"
        );
        // A directory of theirs on the way: they could swap what is in it.
        std::os::unix::fs::chown(&real, Some(me + 4242), None).unwrap();
        let problem = refusal(&real.join("state"));
        assert!(
            matches!(problem, PathProblem::ForeignDir { .. }),
            "{problem}"
        );
        assert!(!real.join("state").exists());
        // Theirs in a sticky dir open to all: refused even as the last component.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let problem = refusal(&real);
        assert!(
            matches!(problem, PathProblem::ForeignEntry { .. }),
            "{problem}"
        );
    }
}
