//! Mode tables, written out from the specification (not taken from the engine).

use dlm_core::Mode;

use crate::*;

pub(crate) fn compat(a: Mode, b: Mode) -> bool {
    use Mode::*;
    match a {
        Nl => true,
        Cr => b != Ex,
        Cw => matches!(b, Nl | Cr | Cw),
        Pr => matches!(b, Nl | Cr | Pr),
        Pw => matches!(b, Nl | Cr),
        Ex => b == Nl,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LvbAct {
    Read,
    Write,
    Nothing,
}

pub(crate) fn lvb_action(from: Option<Mode>, to: Mode) -> LvbAct {
    match from {
        None => LvbAct::Read,
        Some(Mode::Pw) if to == Mode::Ex => LvbAct::Read,
        Some(Mode::Pw) | Some(Mode::Ex) => LvbAct::Write,
        Some(from) if to >= from => LvbAct::Read,
        Some(_) => LvbAct::Nothing,
    }
}

pub(crate) fn padded(lvb: &[u8]) -> Vec<u8> {
    let mut v = lvb.to_vec();
    v.resize(LVB_LEN, 0);
    v
}
