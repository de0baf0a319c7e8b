//! The form a granted copy takes when it goes back to its master in
//! recovery: the mode it is added back in, given what its request in
//! flight (lost with the old epoch, or not) may have done.

use crate::cluster::requester::RemoteLock;
use crate::effect::Op;
use crate::flags::{LockFlags, UnlockFlags};
use crate::mode::{Mode, ModeSet};
use crate::request::ClientRequest;

/// How a granted copy goes back to its master.
pub(super) struct Form {
    /// The mode it is added back in; none when its unlock was in flight
    /// (the unlock counts as done, as the Linux DLM fakes its reply).
    pub(super) mode: Option<Mode>,
    /// Other modes its old master may have left it in, which `mode` does
    /// not stand for: its new master picks among them once every lock is
    /// back (see `settle_recovered`).
    pub(super) or_modes: ModeSet,
    /// What it had in flight may have written the value block.
    pub(super) lvb_unsure: bool,
}

/// The form of a granted copy whose request in flight may or may not have
/// reached its master before the view voided it. A conversion may have left
/// the lock in any of a few modes (its granted mode, its requested mode, an
/// alternate mode, NL when a conversion deadlock could have demoted it).
/// Most often one mode stands for them all: the strongest mode compatible
/// with whatever any of them allows, which also conflicts with whatever
/// all of them conflict with (its requested mode when converting down, its
/// granted mode when converting up): whichever the master had, the locks
/// granted beside it stay compatible, and nothing the client may still rely
/// on is granted to another. When the modes include both CW and PR (a
/// conversion between them), no mode does both (CR lets PW through, which
/// neither allows): the lock comes back in its granted mode, the one its
/// client relies on, with the others as `or_modes` for its master to
/// choose from should a lock granted beside it say the conversion was made
/// (the Linux DLM's `recover_conversion`). The conversion is then sent again.
pub(super) fn recovery_form(copy: &RemoteLock) -> Option<Form> {
    let granted = copy.granted?;
    let writes = granted.unlock_writes_lvb();
    let form = match (copy.pending, &copy.resend) {
        (Some(Op::Convert), Some(ClientRequest::Convert(req))) => {
            let from = if req.flags.contains(LockFlags::CONVDEADLK) { Mode::Nl } else { granted };
            let mut possible = ModeSet::of(&[from, req.mode]);
            if req.flags.contains(LockFlags::ALTPR) {
                possible = possible.with(Mode::Pr);
            }
            if req.flags.contains(LockFlags::ALTCW) {
                possible = possible.with(Mode::Cw);
            }
            let floor = possible.strongest_first().fold(Mode::Ex, common_floor);
            let lvb_flags = req.flags.contains(LockFlags::VALBLK) || req.flags.contains(LockFlags::IVVALBLK);
            if stands_for(floor, possible) {
                Form {
                    mode: Some(floor),
                    or_modes: ModeSet::EMPTY,
                    lvb_unsure: writes && floor != granted && lvb_flags,
                }
            } else {
                Form { mode: Some(from), or_modes: possible.without(from), lvb_unsure: writes && lvb_flags }
            }
        }
        (Some(Op::Unlock), Some(ClientRequest::Unlock(req))) => {
            let lvb_flags = req.flags.contains(UnlockFlags::VALBLK) || req.flags.contains(UnlockFlags::IVVALBLK);
            Form { mode: None, or_modes: ModeSet::EMPTY, lvb_unsure: writes && lvb_flags }
        }
        _ => Form { mode: Some(granted), or_modes: ModeSet::EMPTY, lvb_unsure: false },
    };
    Some(form)
}

/// Whether `mode` conflicts with exactly what every mode of `possible`
/// conflicts with.
fn stands_for(mode: Mode, possible: ModeSet) -> bool {
    Mode::ALL.iter().all(|&m| mode.compatible(m) != possible.strongest_first().all(|p| !p.compatible(m)))
}

/// The strongest mode compatible with every mode that `a` or `b` is.
fn common_floor(a: Mode, b: Mode) -> Mode {
    let allowed = |m: Mode| a.compatible(m) || b.compatible(m);
    Mode::ALL
        .iter()
        .rev()
        .copied()
        .find(|x| Mode::ALL.iter().all(|&m| !allowed(m) || x.compatible(m)))
        .unwrap_or(Mode::Nl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_in_doubt_is_added_back_in_a_mode_both_ends_allow() {
        assert_eq!(common_floor(Mode::Ex, Mode::Nl), Mode::Nl, "down: the requested mode");
        assert_eq!(common_floor(Mode::Nl, Mode::Ex), Mode::Nl, "up: the granted mode");
        assert_eq!(common_floor(Mode::Pr, Mode::Pw), Mode::Pr);
        assert_eq!(common_floor(Mode::Cw, Mode::Pr), Mode::Cr, "neither contains the other");
        assert_eq!(common_floor(Mode::Pr, Mode::Cw), Mode::Cr);
        assert_eq!(common_floor(Mode::Ex, Mode::Ex), Mode::Ex);
    }

    #[test]
    fn only_a_conversion_between_cw_and_pr_has_no_mode_that_stands_for_both_ends() {
        for from in Mode::ALL {
            for to in Mode::ALL {
                let possible = ModeSet::of(&[from, to]);
                let floor = common_floor(from, to);
                let middle = possible.contains(Mode::Cw) && possible.contains(Mode::Pr);
                assert_eq!(stands_for(floor, possible), !middle, "{from:?} to {to:?}: floor {floor:?}");
            }
        }
    }
}
