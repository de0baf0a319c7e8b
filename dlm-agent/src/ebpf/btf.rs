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

/// The type section of BTF `data`, indexed by type id.
struct Types<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Offset of each type's header in `types`; index 0 is `void`.
    offsets: Vec<usize>,
}

const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;

impl<'a> Types<'a> {
    fn parse(data: &'a [u8]) -> Result<Types<'a>, BtfError> {
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
        let mut offsets = vec![0];
        let mut at = 0;
        while at + 12 <= types.len() {
            offsets.push(at);
            let info = u32_at(types, at + 4)?;
            at += 12 + extra_len((info >> 24) & 0x1f, (info & 0xffff) as usize)?;
        }
        Ok(Types { types, strings, offsets })
    }

    /// (kind, vlen, kind_flag, name, size-or-type) of type `id`.
    fn header(&self, id: u32) -> Result<(u32, usize, bool, &'a [u8], u32), BtfError> {
        let at = *self.offsets.get(id as usize).filter(|_| id != 0).ok_or(BtfError::Malformed("type id"))?;
        let info = u32_at(self.types, at + 4)?;
        let name = string_at(self.strings, u32_at(self.types, at)?);
        Ok(((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1, name, u32_at(self.types, at + 8)?))
    }

    /// [`member_offset`] on parsed types.
    fn member(&self, name: &str, member: &str) -> Result<usize, BtfError> {
        let not_found = || BtfError::NotFound { name: name.to_owned(), member: member.to_owned() };
        let id = self.find_struct(name).ok_or_else(not_found)?;
        self.member_offset(id, member, 0)?.ok_or_else(not_found)
    }

    /// [`struct_size`] on parsed types.
    fn size(&self, name: &str) -> Result<usize, BtfError> {
        let id = self
            .find_struct(name)
            .ok_or_else(|| BtfError::NotFound { name: name.to_owned(), member: String::new() })?;
        Ok(self.header(id)?.4 as usize)
    }

    /// The struct called `name`: its type id.
    fn find_struct(&self, name: &str) -> Option<u32> {
        (1..self.offsets.len() as u32).find(|&id| {
            self.header(id).is_ok_and(|(kind, _, _, found, _)| kind == KIND_STRUCT && found == name.as_bytes())
        })
    }

    /// The byte offset of `member` in struct or union `id`, looking inside
    /// anonymous struct and union members (as C does).
    fn member_offset(&self, id: u32, member: &str, depth: u32) -> Result<Option<usize>, BtfError> {
        let (kind, vlen, bitfields, _, _) = self.header(id)?;
        if (kind != KIND_STRUCT && kind != KIND_UNION) || depth > 8 {
            return Ok(None);
        }
        let at = self.offsets[id as usize];
        for index in 0..vlen {
            let entry = at + 12 + index * 12;
            let name = string_at(self.strings, u32_at(self.types, entry)?);
            let raw = u32_at(self.types, entry + 8)?;
            let bits = if bitfields { raw & 0x00ff_ffff } else { raw };
            let whole_bytes = bits % 8 == 0 && !(bitfields && raw >> 24 != 0);
            if name == member.as_bytes() && whole_bytes {
                return Ok(Some((bits / 8) as usize));
            }
            if name.is_empty() && whole_bytes {
                let inner = self.resolve(u32_at(self.types, entry + 4)?)?;
                if let Some(offset) = self.member_offset(inner, member, depth + 1)? {
                    return Ok(Some((bits / 8) as usize + offset));
                }
            }
        }
        Ok(None)
    }

    /// Type `id` with typedefs and qualifiers looked through.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..16 {
            let (kind, _, _, _, target) = self.header(id)?;
            if !matches!(kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT) {
                return Ok(id);
            }
            id = target;
        }
        Err(BtfError::Malformed("type chain too long"))
    }
}

/// The byte offset of `member` in struct `name` (little-endian BTF),
/// members of anonymous structs and unions included.
///
/// # Errors
/// Malformed data, or no such struct or member (a bitfield counts as not found).
pub fn member_offset(data: &[u8], name: &str, member: &str) -> Result<usize, BtfError> {
    Types::parse(data)?.member(name, member)
}

/// The size in bytes of struct `name`.
///
/// # Errors
/// Malformed data, or no such struct.
pub fn struct_size(data: &[u8], name: &str) -> Result<usize, BtfError> {
    Types::parse(data)?.size(name)
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
    /// `comm`, `mm`, and in `struct mm_struct` the approximate count of
    /// anonymous pages (`rss_stat[MM_ANONPAGES].count`, what
    /// `get_mm_counter` reads): what an OOM victim event reports. `None`
    /// on a kernel laid out otherwise; the event then says 0 pages.
    pub oom: Option<OomOffsets>,
}

/// See [`TaskOffsets::oom`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomOffsets {
    /// `task_struct.comm`.
    pub comm: usize,
    /// `task_struct.mm`.
    pub mm: usize,
    /// `mm_struct.rss_stat[MM_ANONPAGES].count`.
    pub anon_pages: usize,
}

/// `MM_ANONPAGES` in the kernel's `enum` of memory counters.
const MM_ANONPAGES: usize = 1;

fn oom_offsets_in(types: &Types) -> Result<OomOffsets, BtfError> {
    let counter = types.size("percpu_counter")?;
    Ok(OomOffsets {
        comm: types.member("task_struct", "comm")?,
        mm: types.member("task_struct", "mm")?,
        anon_pages: types.member("mm_struct", "rss_stat")?
            + MM_ANONPAGES * counter
            + types.member("percpu_counter", "count")?,
    })
}

/// The [`TaskOffsets`] in BTF `data`.
///
/// # Errors
/// See [`member_offset`].
pub fn task_offsets_in(data: &[u8]) -> Result<TaskOffsets, BtfError> {
    let types = Types::parse(data)?;
    Ok(TaskOffsets {
        pid: types.member("task_struct", "pid")?,
        tgid: types.member("task_struct", "tgid")?,
        run_delay: types.member("task_struct", "sched_info")? + types.member("sched_info", "run_delay")?,
        oom: oom_offsets_in(&types).ok(),
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

    /// A BTF blob with one INT, struct `s { int a; int b; }`, and struct
    /// `o { int x; const struct { int a; int b; }; }` whose inner struct is
    /// anonymous and reached through a `const` qualifier.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0o\0x\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        push(&[1, 1 << 24, 4, 32]); // [1] int, size 4, 32 bits
        push(&[5, (4 << 24) | 2, 8]); // [2] struct s, 2 members, size 8
        push(&[7, 1, 0]); // a: int at bit 0
        push(&[9, 1, 32]); // b: int at bit 32
        push(&[0, (4 << 24) | 2, 8]); // [3] anonymous struct, size 8
        push(&[7, 1, 0]); // a at bit 0
        push(&[9, 1, 32]); // b at bit 32
        push(&[0, 10 << 24, 3]); // [4] const [3]
        push(&[11, (4 << 24) | 2, 16]); // [5] struct o, size 16
        push(&[13, 1, 0]); // x at bit 0
        push(&[0, 4, 64]); // anonymous member of type [4] at bit 64
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
        assert_eq!(struct_size(&data, "s").ok(), Some(8));
        assert_eq!(member_offset(&data, "o", "x").ok(), Some(0));
        assert_eq!(member_offset(&data, "o", "b").ok(), Some(12), "inside the anonymous struct, at 8 + 4");
        assert_eq!(struct_size(&data, "o").ok(), Some(16));
        assert!(matches!(struct_size(&data, "t"), Err(BtfError::NotFound { .. })));
    }
}
