//! Request flags (what the caller asks for) and status flags (what a completion
//! reports besides its status), with the DLM's names.
//!
//! `CONVERT`, `CANCEL` and `FORCEUNLOCK` of the Linux API are not flags here:
//! a conversion is [`crate::ClientRequest::Convert`], a cancel is
//! [`crate::ClientRequest::Cancel`], and a forced unlock is
//! [`UnlockFlags::FORCE`], so that a request cannot carry a flag that makes no
//! sense for it.

use std::fmt;

macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$fmeta:meta])* $flag:ident = $bit:expr, $text:literal; )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name(u32);

        impl $name {
            $( $(#[$fmeta])* pub const $flag: Self = Self(1 << $bit); )*

            /// No flag.
            pub const EMPTY: Self = Self(0);
            /// Every flag this set defines.
            pub const ALL: Self = Self(0 $(| (1 << $bit))*);

            /// The raw bits.
            #[must_use]
            pub const fn bits(self) -> u32 {
                self.0
            }

            /// The set with these bits, or `None` when a bit names no flag.
            #[must_use]
            pub const fn from_bits(bits: u32) -> Option<Self> {
                if bits & !Self::ALL.0 == 0 { Some(Self(bits)) } else { None }
            }

            /// Whether every flag of `other` is set.
            #[must_use]
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether any flag of `other` is set.
            #[must_use]
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            /// Both sets together.
            #[must_use]
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// Whether no flag is set.
            #[must_use]
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// Adds `other`'s flags.
            pub fn insert(&mut self, other: Self) {
                self.0 |= other.0;
            }

            /// Removes `other`'s flags.
            pub fn remove(&mut self, other: Self) {
                self.0 &= !other.0;
            }

            /// Each flag's name and value, in bit order.
            pub const NAMES: &'static [(&'static str, Self)] = &[$(($text, Self::$flag)),*];

            /// Parses one flag name, in any case.
            #[must_use]
            pub fn parse_one(name: &str) -> Option<Self> {
                Self::NAMES.iter().find(|(text, _)| text.eq_ignore_ascii_case(name)).map(|&(_, flag)| flag)
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, other: Self) -> Self {
                self.union(other)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                for (text, flag) in Self::NAMES {
                    if self.contains(*flag) {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(text)?;
                        first = false;
                    }
                }
                if first {
                    f.write_str("-")?;
                }
                Ok(())
            }
        }
    };
}

flag_set! {
    /// Flags of a lock or convert request.
    LockFlags {
        /// Try-lock: fail with [`crate::Status::WouldBlock`] instead of waiting.
        NOQUEUE = 0, "NOQUEUE";
        /// With `NOQUEUE`: when the try fails, still send blocking callbacks
        /// to the holders that are in the way (the Linux DLM's meaning).
        NOQUEUEBAST = 1, "NOQUEUEBAST";
        /// Read the value block on grant (and write it where the table says so).
        VALBLK = 2, "VALBLK";
        /// Invalidate the value block instead of writing it (down-conversion from PW/EX).
        IVVALBLK = 3, "IVVALBLK";
        /// Conversion only: queue behind other conversions even when grantable now.
        QUECVT = 4, "QUECVT";
        /// Conversion only: on a conversion deadlock, demote this lock's granted
        /// mode to NL (status `DEMOTED`) instead of failing with `EDEADLK`.
        CONVDEADLK = 5, "CONVDEADLK";
        /// New NL request only: granted at once even if others wait.
        EXPEDITE = 6, "EXPEDITE";
        /// Grant as soon as compatible, regardless of queue order.
        NOORDER = 7, "NOORDER";
        /// Queue at the head instead of the tail.
        HEADQUE = 8, "HEADQUE";
        /// If the requested mode cannot be granted but PR can, grant PR (status `ALTMODE`).
        ALTPR = 9, "ALTPR";
        /// If the requested mode cannot be granted but CW can, grant CW (status `ALTMODE`).
        ALTCW = 10, "ALTCW";
        /// The lock outlives its session as an orphan, until adopted or purged.
        PERSISTENT = 11, "PERSISTENT";
        /// New request only: adopt an orphan of this resource held in this mode
        /// instead of creating a lock (the Linux DLM's `DLM_LKF_ORPHAN`).
        ADOPT = 12, "ADOPT";
    }
}

flag_set! {
    /// Flags of an unlock request.
    UnlockFlags {
        /// Unlock even when a request on the lock is still pending (that
        /// request completes with [`crate::Status::Cancelled`] first).
        FORCE = 0, "FORCEUNLOCK";
        /// Write the given value block (holders of PW/EX only).
        VALBLK = 1, "VALBLK";
        /// Mark the value block invalid instead of writing it (holders of PW/EX only).
        IVVALBLK = 2, "IVVALBLK";
    }
}

flag_set! {
    /// What a completion reports besides its status (the DLM's `sb_flags`).
    StatusFlags {
        /// The lock's granted mode was demoted to NL to break a conversion deadlock.
        DEMOTED = 0, "DEMOTED";
        /// The lock was granted in its alternate mode (`ALTPR`/`ALTCW`).
        ALTMODE = 1, "ALTMODE";
        /// The value block returned is not valid: a PW/EX holder invalidated it
        /// or went away without writing it.
        VALNOTVALID = 2, "VALNOTVALID";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bits_rejects_unknown_bits() {
        assert_eq!(LockFlags::from_bits(0b11), Some(LockFlags::NOQUEUE | LockFlags::NOQUEUEBAST));
        assert_eq!(LockFlags::from_bits(1 << 31), None);
        assert_eq!(UnlockFlags::from_bits(1 << 3), None);
    }

    #[test]
    fn display_lists_names() {
        assert_eq!((LockFlags::NOQUEUE | LockFlags::VALBLK).to_string(), "NOQUEUE|VALBLK");
        assert_eq!(StatusFlags::EMPTY.to_string(), "-");
        assert_eq!(LockFlags::parse_one("quecvt"), Some(LockFlags::QUECVT));
    }
}
