//! Symbolizing stack addresses: kernel addresses from `/proc/kallsyms`, user
//! addresses by function name with `blazesym` (from the process's ELF
//! symbols and, where present, its DWARF debug info), and where that finds
//! nothing (a stripped binary, a process gone) as `module+offset` from
//! `/proc/PID/maps` (enough for a reader to resolve with `addr2line`).

use std::collections::BTreeMap;

/// Kernel symbols by start address.
pub struct KernelSymbols {
    symbols: BTreeMap<u64, String>,
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms`. Without the privilege to see addresses it reads
    /// all zeros, and every lookup answers with the raw address.
    pub fn load() -> KernelSymbols {
        let symbols = aya::util::kernel_symbols().unwrap_or_default();
        KernelSymbols { symbols: symbols.into_iter().filter(|(address, _)| *address != 0).collect() }
    }

    /// The function containing `address`, as `name+0xoffset`.
    pub fn resolve(&self, address: u64) -> String {
        match self.symbols.range(..=address).next_back() {
            Some((start, name)) if address - start < 1 << 20 => {
                if address == *start {
                    name.clone()
                } else {
                    format!("{name}+{:#x}", address - start)
                }
            }
            _ => format!("{address:#x}"),
        }
    }

    /// The function name alone (no offset, no module), for folded stacks.
    pub fn function(&self, address: u64) -> String {
        let resolved = self.resolve(address);
        resolved.split(['+', '\t', ' ']).next().unwrap_or(&resolved).to_owned()
    }
}

/// User-space frames of one process, symbolized.
pub struct UserSymbols {
    pid: u32,
    maps: UserMaps,
    symbolizer: blazesym::symbolize::Symbolizer,
}

impl UserSymbols {
    /// For process `pid` (its mappings are read now).
    pub fn load(pid: u32) -> UserSymbols {
        UserSymbols { pid, maps: UserMaps::load(pid), symbolizer: blazesym::symbolize::Symbolizer::new() }
    }

    /// Each address's function name (demangled), else `module+0xoffset`;
    /// with `lines`, followed by `[file:line]` where debug info gives it.
    pub fn functions(&self, addresses: &[u64], lines: bool) -> Vec<String> {
        // DWARF first; a file whose debug information blazesym cannot read
        // (some distributions' debug links) fails the whole batch, so then
        // address by address, with the ELF symbols alone where DWARF fails.
        let names = self.symbolize(addresses, true, lines).unwrap_or_else(|| {
            addresses
                .iter()
                .map(|&address| {
                    let one = [address];
                    let found = self.symbolize(&one, true, lines).or_else(|| self.symbolize(&one, false, false));
                    found.and_then(|mut v| v.pop().flatten())
                })
                .collect()
        });
        names
            .into_iter()
            .zip(addresses)
            .map(|(name, &address)| name.unwrap_or_else(|| self.maps.resolve(address)))
            .collect()
    }

    fn symbolize(&self, addresses: &[u64], debug_syms: bool, lines: bool) -> Option<Vec<Option<String>>> {
        use blazesym::symbolize::{Input, source::Process, source::Source};
        let mut process = Process::new(blazesym::Pid::Pid(std::num::NonZeroU32::new(self.pid)?));
        process.debug_syms = debug_syms;
        let found = self.symbolizer.symbolize(&Source::Process(process), Input::AbsAddr(addresses)).ok()?;
        Some(
            found
                .into_iter()
                .map(|s| {
                    let sym = s.into_sym()?;
                    let name = folded_name(&sym.name);
                    let place = sym.code_info.as_ref().filter(|_| lines).and_then(|code| {
                        let file = std::path::Path::new(&code.file).file_name()?.to_string_lossy().into_owned();
                        Some(format!("{name}_[{}:{}]", folded_name(&file), code.line?))
                    });
                    Some(place.unwrap_or(name))
                })
                .collect(),
        )
    }
}

/// A function name fit for a folded stack, whose separators are `;` and the
/// last space.
fn folded_name(name: &str) -> String {
    name.replace(';', ":").replace(' ', "_")
}

/// The executable mappings of one process.
pub struct UserMaps {
    /// (start, end, file offset, path)
    mappings: Vec<(u64, u64, u64, String)>,
}

impl UserMaps {
    /// Reads `/proc/PID/maps`; empty when the process is gone.
    pub fn load(pid: u32) -> UserMaps {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        UserMaps { mappings: parse_maps(&text) }
    }

    /// `module+0xoffset` for an address in a mapped file, else the address.
    pub fn resolve(&self, address: u64) -> String {
        for (start, end, offset, path) in &self.mappings {
            if (*start..*end).contains(&address) {
                let module = path.rsplit('/').next().unwrap_or(path);
                return format!("{module}+{:#x}", address - start + offset);
            }
        }
        format!("{address:#x}")
    }
}

fn parse_maps(text: &str) -> Vec<(u64, u64, u64, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let path = fields.nth(2)?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
                u64::from_str_radix(offset, 16).ok()?,
                path.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addresses_resolve_to_the_enclosing_symbol() {
        let symbols = KernelSymbols {
            symbols: BTreeMap::from([(0x1000, "schedule".to_owned()), (0x2000, "mutex_lock".to_owned())]),
        };
        assert_eq!(symbols.resolve(0x1000), "schedule");
        assert_eq!(symbols.resolve(0x1010), "schedule+0x10");
        assert_eq!(symbols.function(0x2040), "mutex_lock");
        assert_eq!(symbols.resolve(0x10), "0x10");
    }

    #[test]
    fn user_addresses_resolve_to_module_offsets() {
        let maps = UserMaps {
            mappings: parse_maps(
                "5600-5700 r--p 00000000 08:01 1 /usr/bin/app\n\
                 5700-5900 r-xp 00001000 08:01 1 /usr/bin/app\n\
                 7f00-7f80 r-xp 00020000 08:01 2 /usr/lib/libc.so.6\n\
                 7ff0-7ff8 rw-p 00000000 00:00 0 [stack]\n",
            ),
        };
        assert_eq!(maps.resolve(0x5710), "app+0x1010");
        assert_eq!(maps.resolve(0x7f10), "libc.so.6+0x20010");
        assert_eq!(maps.resolve(0x7ff1), "0x7ff1");
    }
}
