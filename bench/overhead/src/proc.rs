//! Process facts from `/proc`: CPU time of a process and of its threads, RSS, CPU affinity.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;

/// Clock ticks per second for `/proc/*/stat` times.
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `utime + stime` of a process (all its threads, dead ones included), in microseconds.
pub fn process_cpu_us(pid: u32) -> Result<u64> {
    let text =
        fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks = stat_ticks(&text).context("parse /proc/PID/stat")?;
    Ok(ticks * 1_000_000 / ticks_per_sec())
}

/// `utime + stime` ticks from a `/proc/*/stat` line.
pub fn stat_ticks(text: &str) -> Option<u64> {
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Threads of a process: `(tid, name)`.
pub fn threads(pid: u32) -> Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let name = fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
        out.push((tid, name));
    }
    out.sort();
    Ok(out)
}

/// Nanoseconds a thread has run (`/proc/PID/task/TID/schedstat`, first field).
pub fn thread_cpu_ns(pid: u32, tid: u32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))?;
    text.split_whitespace().next().and_then(|v| v.parse().ok()).context("parse schedstat")
}

/// Resident set size of a process in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).context("parse VmRSS")?;
    Ok(kb * 1024)
}

/// The pid of the process whose command line has `arg` as one argument.
pub fn find_pid_with_arg(arg: &Path) -> Result<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    for e in fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else { continue };
        if cmd.split(|&b| b == 0).any(|a| a == want) {
            return Ok(pid);
        }
    }
    bail!("no process has argument {}", arg.display())
}

/// Number of CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Pins a thread (`tid`, 0 = the calling thread) to one CPU.
pub fn pin(tid: u32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity({tid}, cpu {cpu}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every thread of a process to one CPU.
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    for (tid, _) in threads(pid)? {
        pin(tid, cpu)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let line = "123 (wrk:worker 0) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(stat_ticks(line), Some(300));
        assert_eq!(stat_ticks("garbage"), None);
    }
}
