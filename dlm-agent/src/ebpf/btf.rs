//! Just enough of a BTF reader to find struct member offsets in the running
//! kernel's `/sys/kernel/btf/vmlinux`: the BTF tracepoint programs read
//! `task_struct.pid` and `.tgid` through pointers, and aya (in Rust) has no
//! CO-RE field relocation, so the loader passes the offsets in as globals.

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file is not BTF or is cut short.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// No such struct or member.
    #[error("no member {member} in struct {name}")]
    NotFound {
        /// Struct name.
        name: String,
        /// Member name.
        member: String,
    },
    /// The file could not be read.
    #[error("reading BTF: {0}")]
    Io(#[from] std::io::Error),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or(BtfError::Malformed("truncated"))
}

fn string_at(strings: &[u8], offset: u32) -> &[u8] {
    let rest = strings.get(offset as usize..).unwrap_or_default();
    &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
}

/// Bytes that follow a type's 12-byte header, by kind.
fn extra_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
        3 => 12,                      // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
        2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        _ => return Err(BtfError::Malformed("unknown kind")),
    })
}

/// The byte offset of `member` in struct `name` (little-endian BTF).
///
/// # Errors
/// Malformed data, or no such struct or member (a bitfield counts as not found).
pub fn member_offset(data: &[u8], name: &str, member: &str) -> Result<usize, BtfError> {
    if data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])) != Some(MAGIC) {
        return Err(BtfError::Malformed("bad magic"));
    }
    let header_len = u32_at(data, 4)? as usize;
    let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
    let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
    let types =
        data.get(header_len + type_off..header_len + type_off + type_len).ok_or(BtfError::Malformed("types"))?;
    let strings =
        data.get(header_len + str_off..header_len + str_off + str_len).ok_or(BtfError::Malformed("strings"))?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let (kind, vlen, bitfields) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
        let extra = extra_len(kind, vlen)?;
        if kind == KIND_STRUCT && string_at(strings, name_off) == name.as_bytes() {
            for index in 0..vlen {
                let entry = at + 12 + index * 12;
                if string_at(strings, u32_at(types, entry)?) == member.as_bytes() {
                    let raw = u32_at(types, entry + 8)?;
                    let bits = if bitfields { raw & 0x00ff_ffff } else { raw };
                    if bits % 8 == 0 && !(bitfields && raw >> 24 != 0) {
                        return Ok((bits / 8) as usize);
                    }
                }
            }
        }
        at += 12 + extra;
    }
    Err(BtfError::NotFound { name: name.to_owned(), member: member.to_owned() })
}

/// The `task_struct` fields the programs read, by byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `pid` (the thread id).
    pub pid: usize,
    /// `tgid` (the process id).
    pub tgid: usize,
    /// `sched_info.run_delay`: the kernel's total of the task's run-queue waits.
    pub run_delay: usize,
}

/// The [`TaskOffsets`] in BTF `data`.
///
/// # Errors
/// See [`member_offset`].
pub fn task_offsets_in(data: &[u8]) -> Result<TaskOffsets, BtfError> {
    Ok(TaskOffsets {
        pid: member_offset(data, "task_struct", "pid")?,
        tgid: member_offset(data, "task_struct", "tgid")?,
        run_delay: member_offset(data, "task_struct", "sched_info")? + member_offset(data, "sched_info", "run_delay")?,
    })
}

/// Where the saved system call number is in `struct pt_regs`, with this
/// architecture's `futex(2)` and `futex_waitv(2)` numbers: what tells a
/// futex wait from another sleep. `None` where not known (only x86-64 is).
///
/// # Errors
/// See [`member_offset`].
pub fn futex_syscall_in(data: &[u8]) -> Result<Option<FutexSyscall>, BtfError> {
    if cfg!(target_arch = "x86_64") {
        let offset = member_offset(data, "pt_regs", "orig_ax")?;
        return Ok(Some(FutexSyscall { offset, futex: 202, futex_waitv: 449 }));
    }
    Ok(None)
}

/// See [`futex_syscall_in`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FutexSyscall {
    /// Offset of the saved system call number in `struct pt_regs`.
    pub offset: usize,
    /// `__NR_futex`.
    pub futex: u64,
    /// `__NR_futex_waitv`.
    pub futex_waitv: u64,
}

/// The [`TaskOffsets`] of the running kernel, and where its futex system
/// calls can be recognised.
///
/// # Errors
/// `/sys/kernel/btf/vmlinux` is missing or unreadable, or lacks a field.
pub fn task_offsets() -> Result<(TaskOffsets, Option<FutexSyscall>), BtfError> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
    Ok((task_offsets_in(&data)?, futex_syscall_in(&data)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with one INT and one struct `s { int a; int b; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        push(&[1, 1 << 24, 4, 32]); // [1] int, size 4, 32 bits
        push(&[5, (4 << 24) | 2, 8]); // [2] struct s, 2 members, size 8
        push(&[7, 1, 0]); // a: int at bit 0
        push(&[9, 1, 32]); // b: int at bit 32
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for word in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            data.extend_from_slice(&word.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn member_offsets_are_found_in_bytes() {
        let data = blob();
        assert_eq!(member_offset(&data, "s", "a").ok(), Some(0));
        assert_eq!(member_offset(&data, "s", "b").ok(), Some(4));
        assert!(matches!(member_offset(&data, "s", "c"), Err(BtfError::NotFound { .. })));
        assert!(matches!(member_offset(&data[..10], "s", "a"), Err(BtfError::Malformed(_))));
        assert!(matches!(member_offset(b"nope", "s", "a"), Err(BtfError::Malformed(_))));
    }
}
