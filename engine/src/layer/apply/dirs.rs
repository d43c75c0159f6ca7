//! Directory fds of the target, by normalized path: how every entry finds
//! its parent without ever joining path strings.
//!
//! A lookup walks from the deepest cached ancestor one component at a time
//! with `openat(O_DIRECTORY | O_NOFOLLOW)`, creating missing components
//! (0755, root-owned) when asked. When a component is a symlink the layer
//! planted, the walk re-resolves the path from the root with `openat2`
//! and `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: the kernel then follows
//! the link as if the target directory were `/`, so an absolute link,
//! `../../..` or a chain of them can never lead outside, and a loop ends in
//! `ELOOP`. Paths reached through a symlink are not cached, so a later
//! change of the link or of what it points to is always seen.
//!
//! The cache only holds directories this walk opened itself. When an entry
//! replaces something at a path, the applier drops that path and
//! everything below it ([`Dirs::invalidate`]).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::fsops::syscalls::open_dir;

/// Most directory fds kept open; past it the cache starts over (jobs in
/// flight hold their own references), and a walk deeper than what is left
/// caches no more of its levels: one walk holds one fd of its own at a
/// time, however deep the path.
const MAX_CACHED: usize = 256;

/// Creates a missing directory: (parent fd, name).
pub type MakeDir<'f> = dyn FnMut(&Arc<OwnedFd>, &CStr) -> Result<(), ApplyError> + 'f;

/// What to do about a missing directory on the way.
pub enum Missing<'f> {
    /// Create it with this function.
    Create(&'f mut MakeDir<'f>),
    /// It is an error (hard link targets).
    Fail,
}

/// The directory fd cache of one apply.
pub struct Dirs {
    root: Arc<OwnedFd>,
    cache: BTreeMap<Vec<u8>, Arc<OwnedFd>>,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn cstr(comp: &[u8]) -> Result<CString, ApplyError> {
    CString::new(comp)
        .map_err(|_| ApplyError::new(ErrorKind::UnsafePath("name contains a NUL byte".into())))
}

fn walk_err(op: &str, path: &[u8], e: Errno) -> ApplyError {
    ApplyError::fs(format!("{op} {:?}", lossy(path)), e.into())
}

impl Dirs {
    /// A cache rooted at the target directory.
    pub fn new(root: OwnedFd) -> Self {
        Dirs {
            root: Arc::new(root),
            cache: BTreeMap::new(),
        }
    }

    /// The target directory.
    pub fn root(&self) -> &Arc<OwnedFd> {
        &self.root
    }

    /// Whether `path` is a cached directory.
    pub fn is_cached(&self, path: &[u8]) -> bool {
        path.is_empty() || self.cache.contains_key(path)
    }

    /// Drops `path` and every cached path below it. Returns whether
    /// anything was dropped.
    pub fn invalidate(&mut self, path: &[u8]) -> bool {
        let keys = keys_under(&self.cache, path);
        for k in &keys {
            self.cache.remove(k);
        }
        !keys.is_empty()
    }

    /// Opens (and caches) the directory at normalized `path`.
    pub fn get(
        &mut self,
        path: &[u8],
        missing: &mut Missing<'_>,
    ) -> Result<Arc<OwnedFd>, ApplyError> {
        if path.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.cache.get(path) {
            return Ok(fd.clone());
        }
        // Deepest cached ancestor.
        let mut start = 0usize;
        let mut cur = self.root.clone();
        let mut end = path.len();
        while let Some(i) = path[..end].iter().rposition(|&b| b == b'/') {
            if let Some(fd) = self.cache.get(&path[..i]) {
                cur = fd.clone();
                start = i + 1;
                break;
            }
            end = i;
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        let mut pos = start;
        while pos <= path.len() {
            let comp_end = path[pos..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(path.len(), |i| pos + i);
            let prefix = &path[..comp_end];
            let name = cstr(&path[pos..comp_end])?;
            let fd = match open_dir(cur.as_fd(), &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => match missing {
                    Missing::Create(f) => {
                        f(&cur, &name)?;
                        open_dir(cur.as_fd(), &name)
                            .map_err(|e| walk_err("open directory", prefix, e))?
                    }
                    Missing::Fail => return Err(walk_err("open directory", prefix, Errno::NOENT)),
                },
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    let st = rfs::statat(cur.as_fd(), &name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| walk_err("stat", prefix, e))?;
                    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                        return self.through_symlink(path, comp_end, missing);
                    }
                    return Err(walk_err("parent is not a directory:", prefix, e));
                }
                Err(e) => return Err(walk_err("open directory", prefix, e)),
            };
            cur = Arc::new(fd);
            if self.cache.len() < MAX_CACHED {
                self.cache.insert(prefix.to_vec(), cur.clone());
            }
            pos = comp_end + 1;
        }
        Ok(cur)
    }

    /// Resolves `path`, whose prefix ending at `link_end` is a symlink, from
    /// the root with the kernel confining the walk; creates what is missing
    /// below the deepest existing prefix past the link. Not cached.
    fn through_symlink(
        &mut self,
        path: &[u8],
        link_end: usize,
        missing: &mut Missing<'_>,
    ) -> Result<Arc<OwnedFd>, ApplyError> {
        let mut ends: Vec<usize> = path[link_end..]
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'/')
            .map(|(i, _)| link_end + i)
            .collect();
        ends.push(path.len());
        ends.dedup();
        // Deepest prefix (at or past the link) that resolves.
        for (k, &end) in ends.iter().enumerate().rev() {
            let prefix = &path[..end];
            match resolve_in_root(&self.root, prefix) {
                Ok(fd) => {
                    let mut cur = Arc::new(fd);
                    let mut pos = end + 1;
                    for &next_end in &ends[k + 1..] {
                        let name = cstr(&path[pos..next_end])?;
                        match missing {
                            Missing::Create(f) => f(&cur, &name)?,
                            Missing::Fail => {
                                return Err(walk_err(
                                    "open directory",
                                    &path[..next_end],
                                    Errno::NOENT,
                                ))
                            }
                        }
                        cur = Arc::new(
                            open_dir(cur.as_fd(), &name)
                                .map_err(|e| walk_err("open directory", &path[..next_end], e))?,
                        );
                        pos = next_end + 1;
                    }
                    return Ok(cur);
                }
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(walk_err("resolve", prefix, e)),
            }
        }
        Err(ApplyError::fs(
            format!("resolve {:?}: dangling symlink", lossy(&path[..link_end])),
            Errno::NOENT.into(),
        ))
    }
}

/// Opens the directory at `path` below `root`, following symlinks as if
/// `root` were `/`, and not following one in the last component.
pub fn resolve_in_root(root: &OwnedFd, path: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat2(
        root,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Like [`resolve_in_root`], but a symlink in the last component is not
/// followed (fails).
pub fn open_in_root_nofollow(root: &OwnedFd, path: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat2(
        root,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Keys of `map` equal to `path` or below it (`path/...`).
pub fn keys_under<V>(map: &BTreeMap<Vec<u8>, V>, path: &[u8]) -> Vec<Vec<u8>> {
    map.range(path.to_vec()..)
        .take_while(|(k, _)| k.starts_with(path))
        .filter(|(k, _)| k.len() == path.len() || k[path.len()] == b'/')
        .map(|(k, _)| k.clone())
        .collect()
}

/// Whether `map` has `path` or a key below it.
pub fn has_under<V>(map: &BTreeMap<Vec<u8>, V>, path: &[u8]) -> bool {
    map.range(path.to_vec()..)
        .take_while(|(k, _)| k.starts_with(path))
        .any(|(k, _)| k.len() == path.len() || k[path.len()] == b'/')
}
