//! A disk that loses, refuses and fills: the storage seam's twin for the simulator and tests
//! (STYLE.md "storage faults are part of the model"). Production never builds one.
//!
//! A [`FaultyDisk`] is the physical disk of one (simulated) host. It keeps two images of
//! the database: the **durable** bytes, as of the last successful sync, and the **current**
//! bytes that reads see (the page cache), plus the list of changes made since that sync.
//! It survives the host: the simulator keeps it across crashes and bounces, like a
//! directory on a real disk. Through it a test can:
//!
//! - cut the power ([`FaultyDisk::power_loss`]): every change since the last successful
//!   sync is lost, or only some, the next one torn after a prefix of its bytes
//!   ([`PowerLoss`]). The host's open handles die with it: every later operation of the
//!   old incarnation fails, so a writer thread that outlives its host writes nothing;
//! - make syncs fail with an I/O error ([`FaultyDisk::fail_syncs`]); a failed sync
//!   makes nothing durable (the changes stay unsynced, so a power loss drops them);
//! - bound the space ([`FaultyDisk::set_capacity`]): a write that needs a block beyond the
//!   capacity, or growth of the file past it, fails with `StorageFull` (ENOSPC), as on a
//!   full tmpfs; raising the capacity again is space coming back;
//! - hold syncs ([`FaultyDisk::hold_syncs`]) to stall a writer in the middle of a commit.
//!
//! One database may use the disk at a time (like redb's file lock): a second
//! [`Mount::backend`] while one is open fails with `WouldBlock`.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::StorageBackend;

/// Allocation unit: a write that touches a block never written before needs one more
/// block of space (as tmpfs and most file systems allocate).
pub const BLOCK_BYTES: u64 = 4096;

/// What reaches the disk when the power goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Every change since the last successful sync is lost.
    DropUnsynced,
    /// The first `changes` unsynced changes (writes and length changes, in the order they
    /// were made) reached the disk; of the next one, if it is a write, only the first
    /// `torn_bytes` bytes did (a torn write). `changes` past the end keeps them all.
    Partial { changes: usize, torn_bytes: usize },
}

/// Which syncs fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncFaults {
    None,
    /// The next `n` syncs fail, then they succeed again.
    Next(u32),
    Always,
}

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// Bytes and allocated blocks of one image of the file.
#[derive(Debug, Clone, Default)]
struct Image {
    bytes: Vec<u8>,
    blocks: HashSet<u64>,
}

impl Image {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Write { offset, data } => {
                let (start, end) = (*offset as usize, *offset as usize + data.len());
                if self.bytes.len() < end {
                    self.bytes.resize(end, 0);
                }
                self.bytes[start..end].copy_from_slice(data);
                self.blocks.extend(blocks_of(*offset, data.len()));
            }
            Change::SetLen(len) => {
                self.bytes.resize(*len as usize, 0);
                let first_gone = len.div_ceil(BLOCK_BYTES);
                self.blocks.retain(|b| *b < first_gone);
            }
        }
    }
}

fn blocks_of(offset: u64, len: usize) -> impl Iterator<Item = u64> {
    let first = offset / BLOCK_BYTES;
    let end = (offset + len as u64).div_ceil(BLOCK_BYTES);
    first..end.max(first)
}

#[derive(Debug)]
struct DiskState {
    durable: Image,
    current: Image,
    /// Changes made since the last successful sync, in order.
    unsynced: Vec<Change>,
    capacity_bytes: u64,
    /// Full, and every write needs a new block (a copy-on-write file system).
    full_cow: bool,
    sync_faults: SyncFaults,
    syncs_held: bool,
    syncs_waiting: u32,
    /// Bumped by every power loss: handles of an earlier cycle are dead.
    power_cycle: u64,
    /// The backend that has the database open, if any (the file lock).
    open_backend: Option<u64>,
    next_backend: u64,
    syncs_ok: u64,
    syncs_failed: u64,
    writes_refused: u64,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<DiskState>,
    /// Signalled when syncs are released.
    released: Condvar,
}

/// The physical disk of one simulated host. Cheap to clone; clones are the same disk.
#[derive(Debug, Clone)]
pub struct FaultyDisk(Arc<Inner>);

impl Default for FaultyDisk {
    fn default() -> Self {
        FaultyDisk::new()
    }
}

/// Counters of what the disk did, for assertions and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub syncs_ok: u64,
    pub syncs_failed: u64,
    /// Writes and length changes refused for lack of space.
    pub writes_refused: u64,
    /// Changes made since the last successful sync.
    pub unsynced_changes: usize,
    /// Bytes of allocated blocks in what reads see.
    pub used_bytes: u64,
    pub len_bytes: u64,
}

impl FaultyDisk {
    /// An empty disk of unbounded capacity that never fails.
    pub fn new() -> FaultyDisk {
        FaultyDisk(Arc::new(Inner {
            state: Mutex::new(DiskState {
                durable: Image::default(),
                current: Image::default(),
                unsynced: Vec::new(),
                capacity_bytes: u64::MAX,
                full_cow: false,
                sync_faults: SyncFaults::None,
                syncs_held: false,
                syncs_waiting: 0,
                power_cycle: 0,
                open_backend: None,
                next_backend: 0,
                syncs_ok: 0,
                syncs_failed: 0,
                writes_refused: 0,
            }),
            released: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        // A panicking test thread must not hide the disk from the next assertion.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a host sees when it boots: handles that work until the next power loss.
    pub fn mount(&self) -> Mount {
        Mount {
            disk: self.clone(),
            power_cycle: self.lock().power_cycle,
        }
    }

    /// Cuts the power: what was not synced is lost as `how` says, and every handle of the
    /// running incarnation (its open database, its mounts) fails from now on.
    pub fn power_loss(&self, how: PowerLoss) {
        let mut s = self.lock();
        let mut image = s.durable.clone();
        if let PowerLoss::Partial {
            changes,
            torn_bytes,
        } = how
        {
            let kept = changes.min(s.unsynced.len());
            for c in &s.unsynced[..kept] {
                image.apply(c);
            }
            if let Some(Change::Write { offset, data }) = s.unsynced.get(kept) {
                let torn = Change::Write {
                    offset: *offset,
                    data: data[..torn_bytes.min(data.len())].to_vec(),
                };
                image.apply(&torn);
            }
        }
        s.durable = image.clone();
        s.current = image;
        s.unsynced.clear();
        s.power_cycle += 1;
        s.open_backend = None;
        s.syncs_held = false;
        drop(s);
        self.0.released.notify_all();
    }

    /// Makes the next `n` syncs fail with an I/O error (`None`: every sync from now on).
    pub fn fail_syncs(&self, n: Option<u32>) {
        self.lock().sync_faults = match n {
            Some(0) => SyncFaults::None,
            Some(n) => SyncFaults::Next(n),
            None => SyncFaults::Always,
        };
    }

    /// Bounds the space: allocating blocks beyond `bytes` fails with `StorageFull`.
    /// Raising it again gives the space back (and ends [`FaultyDisk::fill_cow`]).
    pub fn set_capacity(&self, bytes: u64) {
        let mut s = self.lock();
        s.capacity_bytes = bytes;
        s.full_cow = false;
    }

    /// Full on a copy-on-write file system (btrfs, ZFS): every write needs a new block,
    /// so every write fails until [`FaultyDisk::set_capacity`] gives space back.
    pub fn fill_cow(&self) {
        self.fill();
        self.lock().full_cow = true;
    }

    /// Leaves no free block: the next write that needs a new block fails.
    pub fn fill(&self) {
        let mut s = self.lock();
        s.capacity_bytes = s.current.blocks.len() as u64 * BLOCK_BYTES;
        s.full_cow = false;
    }

    /// While held, a sync waits (a stalled disk); releasing lets it finish.
    pub fn hold_syncs(&self, held: bool) {
        self.lock().syncs_held = held;
        if !held {
            self.0.released.notify_all();
        }
    }

    /// An independent copy of this disk's bytes (durable, current and unsynced), with no
    /// database open on it and its faults cleared: to try several power losses on the
    /// same moment.
    pub fn duplicate(&self) -> FaultyDisk {
        let s = self.lock();
        let copy = FaultyDisk::new();
        {
            let mut c = copy.lock();
            c.durable = s.durable.clone();
            c.current = s.current.clone();
            c.unsynced = s.unsynced.clone();
            c.capacity_bytes = s.capacity_bytes;
        }
        copy
    }

    /// Bytes that may still be allocated.
    pub fn free_bytes(&self) -> u64 {
        let s = self.lock();
        if s.full_cow {
            return 0;
        }
        s.capacity_bytes
            .saturating_sub(s.current.blocks.len() as u64 * BLOCK_BYTES)
    }

    /// Syncs waiting in [`FaultyDisk::hold_syncs`] right now.
    pub fn syncs_waiting(&self) -> u32 {
        self.lock().syncs_waiting
    }

    pub fn stats(&self) -> DiskStats {
        let s = self.lock();
        DiskStats {
            syncs_ok: s.syncs_ok,
            syncs_failed: s.syncs_failed,
            writes_refused: s.writes_refused,
            unsynced_changes: s.unsynced.len(),
            used_bytes: s.current.blocks.len() as u64 * BLOCK_BYTES,
            len_bytes: s.current.bytes.len() as u64,
        }
    }
}

/// A disk as one boot of a host sees it. Opening the database goes through here, so
/// after a power loss the previous boot can no longer open it.
#[derive(Debug, Clone)]
pub struct Mount {
    disk: FaultyDisk,
    power_cycle: u64,
}

impl Mount {
    pub fn disk(&self) -> &FaultyDisk {
        &self.disk
    }

    /// A redb backend on the disk; fails while another is open or after a power loss.
    pub fn backend(&self) -> io::Result<FaultyBackend> {
        let mut s = self.disk.lock();
        if s.power_cycle != self.power_cycle {
            return Err(powered_off());
        }
        if s.open_backend.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the simulated disk is in use by another database",
            ));
        }
        let id = s.next_backend;
        s.next_backend += 1;
        s.open_backend = Some(id);
        Ok(FaultyBackend {
            disk: self.disk.clone(),
            power_cycle: self.power_cycle,
            id,
        })
    }
}

fn powered_off() -> io::Error {
    io::Error::other("the simulated host lost power: this handle is dead")
}

fn no_space() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "no space left on the simulated disk",
    )
}

/// redb's view of a [`FaultyDisk`]; see the module docs.
#[derive(Debug)]
pub struct FaultyBackend {
    disk: FaultyDisk,
    power_cycle: u64,
    id: u64,
}

impl FaultyBackend {
    /// The disk state, if this handle is still alive.
    fn alive(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let s = self.disk.lock();
        if s.power_cycle != self.power_cycle || s.open_backend != Some(self.id) {
            return Err(powered_off());
        }
        Ok(s)
    }

    fn release(&self) {
        let mut s = self.disk.lock();
        if s.open_backend == Some(self.id) {
            s.open_backend = None;
        }
    }
}

impl Drop for FaultyBackend {
    fn drop(&mut self) {
        self.release();
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.alive()?.current.bytes.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.alive()?;
        let start = offset as usize;
        let end = start + out.len();
        if end > s.current.bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the simulated file",
            ));
        }
        out.copy_from_slice(&s.current.bytes[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.alive()?;
        if len > s.current.bytes.len() as u64 && (len > s.capacity_bytes || s.full_cow) {
            s.writes_refused += 1;
            return Err(no_space());
        }
        let change = Change::SetLen(len);
        s.current.apply(&change);
        s.unsynced.push(change);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.alive()?;
        while s.syncs_held {
            s.syncs_waiting += 1;
            s = self
                .disk
                .0
                .released
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
            s.syncs_waiting -= 1;
        }
        if s.power_cycle != self.power_cycle {
            return Err(crate::sync_failed(powered_off()));
        }
        let fail = match s.sync_faults {
            SyncFaults::None => false,
            SyncFaults::Always => true,
            SyncFaults::Next(n) => {
                s.sync_faults = if n > 1 {
                    SyncFaults::Next(n - 1)
                } else {
                    SyncFaults::None
                };
                true
            }
        };
        if fail {
            s.syncs_failed += 1;
            return Err(crate::sync_failed(io::Error::other(
                "input/output error (a simulated failed sync)",
            )));
        }
        let changes = std::mem::take(&mut s.unsynced);
        for c in &changes {
            s.durable.apply(c);
        }
        s.syncs_ok += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.alive()?;
        let new_blocks = blocks_of(offset, data.len())
            .filter(|b| !s.current.blocks.contains(b))
            .count() as u64;
        let used = s.current.blocks.len() as u64;
        let full = s.full_cow || (used + new_blocks) * BLOCK_BYTES > s.capacity_bytes;
        if full && (new_blocks > 0 || s.full_cow) {
            s.writes_refused += 1;
            return Err(no_space());
        }
        let change = Change::Write {
            offset,
            data: data.to_vec(),
        };
        s.current.apply(&change);
        s.unsynced.push(change);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.release();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(b: &FaultyBackend) -> Vec<u8> {
        let mut out = vec![0; b.len().unwrap() as usize];
        b.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn power_loss_keeps_only_what_was_synced_or_torn() {
        let disk = FaultyDisk::new();
        let b = disk.mount().backend().unwrap();
        b.set_len(8).unwrap();
        b.write(0, b"aaaaaaaa").unwrap();
        b.sync_data().unwrap();
        b.write(0, b"bbbb").unwrap();
        b.write(4, b"cccc").unwrap();
        assert_eq!(read_all(&b), b"bbbbcccc", "reads see unsynced writes");
        assert_eq!(disk.stats().unsynced_changes, 2);
        disk.power_loss(PowerLoss::Partial {
            changes: 1,
            torn_bytes: 2,
        });
        assert!(b.len().is_err(), "the old incarnation is dead");
        assert!(b.write(0, b"x").is_err());
        drop(b);
        let b = disk.mount().backend().unwrap();
        assert_eq!(read_all(&b), b"bbbbccaa");
        drop(b);
        disk.power_loss(PowerLoss::DropUnsynced);
        let b = disk.mount().backend().unwrap();
        assert_eq!(read_all(&b), b"bbbbccaa", "a power loss is durable itself");
        b.write(0, b"zz").unwrap();
        drop(b);
        disk.power_loss(PowerLoss::DropUnsynced);
        assert_eq!(read_all(&disk.mount().backend().unwrap()), b"bbbbccaa");
    }

    #[test]
    fn failed_syncs_make_nothing_durable() {
        let disk = FaultyDisk::new();
        let b = disk.mount().backend().unwrap();
        b.write(0, b"1111").unwrap();
        disk.fail_syncs(Some(1));
        let e = b.sync_data().unwrap_err();
        assert!(crate::is_sync_failure(&e), "{e}");
        b.write(0, b"2").unwrap();
        drop(b);
        disk.power_loss(PowerLoss::DropUnsynced);
        let b = disk.mount().backend().unwrap();
        assert_eq!(b.len().unwrap(), 0, "the failed sync kept nothing");
        b.write(0, b"3333").unwrap();
        b.sync_data().unwrap();
        assert_eq!(
            disk.stats(),
            DiskStats {
                syncs_ok: 1,
                syncs_failed: 1,
                writes_refused: 0,
                unsynced_changes: 0,
                used_bytes: BLOCK_BYTES,
                len_bytes: 4,
            }
        );
        disk.fail_syncs(None);
        assert!(b.sync_data().is_err());
        assert!(b.sync_data().is_err());
    }

    #[test]
    fn a_full_disk_refuses_new_blocks_until_space_returns() {
        let disk = FaultyDisk::new();
        let b = disk.mount().backend().unwrap();
        b.set_len(3 * BLOCK_BYTES).unwrap();
        b.write(0, &[1; 10]).unwrap();
        disk.fill();
        // Rewriting an allocated block needs no space; a new block does.
        b.write(5, &[2; 10]).unwrap();
        let e = b.write(BLOCK_BYTES, &[3; 10]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(
            b.set_len(4 * BLOCK_BYTES).unwrap_err().kind(),
            io::ErrorKind::StorageFull,
            "growing past the capacity"
        );
        disk.set_capacity(2 * BLOCK_BYTES);
        b.write(BLOCK_BYTES, &[3; 10]).unwrap();
        assert_eq!(disk.stats().writes_refused, 2);
        assert_eq!(disk.stats().used_bytes, 2 * BLOCK_BYTES);
        // Copy-on-write: even a rewrite needs a new block.
        disk.fill_cow();
        assert_eq!(disk.free_bytes(), 0);
        assert_eq!(
            b.write(0, &[4; 10]).unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
        disk.set_capacity(u64::MAX);
        b.write(0, &[4; 10]).unwrap();
    }

    #[test]
    fn one_database_at_a_time_and_none_from_a_dead_boot() {
        let disk = FaultyDisk::new();
        let boot = disk.mount();
        let b = boot.backend().unwrap();
        assert_eq!(
            boot.backend().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        b.close().unwrap();
        let b2 = boot.backend().unwrap();
        drop(b);
        assert!(
            b2.len().is_ok(),
            "closing the old handle twice frees nothing"
        );
        disk.power_loss(PowerLoss::DropUnsynced);
        assert!(boot.backend().is_err(), "a boot before the power loss");
        assert!(disk.mount().backend().is_ok());
    }
}
