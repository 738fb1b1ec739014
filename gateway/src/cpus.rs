//! Which CPUs the shards and the storage I/O threads run on.
//!
//! Each shard thread is pinned to one CPU of the set the process may run on (its affinity mask,
//! e.g. from `taskset`), in order. Each log's writer thread wakes for every group commit; on a
//! shard's core each wake-up preempts the shard, and the shard waits behind it. When the process
//! has CPUs left over after the shards, the writers go there by default (`storage.io_cpus`).
//! The spare-segment makers then run at the lowest priority wherever they may (without CPUs to
//! spare, at normal priority beside the shards), and each router's metadata writer goes where
//! the log writers go. Moving the log writer off the shard's core cut the SendAck p99 by an
//! order of magnitude (docs/design/performance-decisions.md, "The log writer on a CPU the shards
//! leave over").

use std::io;

/// CPUs this thread may run on (its affinity mask), in increasing order.
///
/// # Errors
/// `sched_getaffinity` failed.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set within its bounds (i < CPU_SETSIZE).
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Restricts the calling thread (and the threads it spawns afterwards) to `cpus`.
///
/// # Errors
/// A CPU number is out of range, or `sched_setaffinity` failed (e.g. no CPU of the list is
/// online or allowed by the cgroup).
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {c} is out of range"),
            ));
        }
        // SAFETY: c < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the calling thread the lowest priority (nice 19): for background work (the log's
/// spare-segment maker) that must yield to anything else on its CPU.
///
/// # Errors
/// `setpriority` failed.
pub fn lowest_priority() -> io::Result<()> {
    crate::runtime::set_priority(crate::config::ThreadPriority::Low)
}

/// Where the shards and the storage threads go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `shards[i]`: the CPU shard `i` is pinned to.
    pub shards: Vec<usize>,
    /// The CPUs the log writer threads may run on; empty: wherever the process may run
    /// (beside the shards).
    pub io: Vec<usize>,
}

/// Shard `i` goes to `allowed[i % allowed.len()]`. The log writers go to `io` if given
/// (an empty list: not pinned), otherwise to the allowed CPUs no shard got, if any.
#[must_use]
pub fn place(allowed: &[usize], shards: usize, io: Option<&[usize]>) -> Placement {
    let shard_cpus: Vec<usize> = if allowed.is_empty() {
        Vec::new()
    } else {
        (0..shards).map(|i| allowed[i % allowed.len()]).collect()
    };
    let io = match io {
        Some(list) => list.to_vec(),
        None => allowed
            .iter()
            .copied()
            .filter(|c| !shard_cpus.contains(c))
            .collect(),
    };
    Placement {
        shards: shard_cpus,
        io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_take_the_allowed_cpus_in_order_and_storage_gets_the_rest() {
        // `taskset -c 2,3`, one shard: shard on 2, storage on 3.
        assert_eq!(
            place(&[2, 3], 1, None),
            Placement {
                shards: vec![2],
                io: vec![3]
            }
        );
        // One shard per CPU: nothing left over, storage threads are not pinned.
        assert_eq!(
            place(&[0, 1], 2, None),
            Placement {
                shards: vec![0, 1],
                io: vec![]
            }
        );
        // More shards than CPUs wrap around.
        assert_eq!(place(&[0, 1], 3, None).shards, vec![0, 1, 0]);
        // An explicit list wins, and an empty one means "not pinned".
        assert_eq!(place(&[0, 1, 2, 3], 1, Some(&[3])).io, vec![3]);
        assert!(place(&[0, 1, 2, 3], 1, Some(&[])).io.is_empty());
    }

    #[test]
    fn background_threads_get_nice_19() {
        let nice = std::thread::spawn(|| {
            lowest_priority().unwrap();
            // SAFETY: reads the calling thread's nice value.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(nice, 19);
    }

    #[test]
    fn a_thread_pinned_to_one_allowed_cpu_reports_only_that_cpu() {
        let all = allowed().unwrap();
        assert!(!all.is_empty());
        let first = all[0];
        let got = std::thread::spawn(move || {
            pin_current_thread(&[first]).unwrap();
            // Threads spawned afterwards inherit it.
            std::thread::spawn(allowed).join().unwrap().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, vec![first]);
        assert!(pin_current_thread(&[libc::CPU_SETSIZE as usize]).is_err());
    }
}
