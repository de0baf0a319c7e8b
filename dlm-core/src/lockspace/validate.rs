//! Validation of requests against the lockspace's settings and the flag
//! rules: nothing invalid reaches the grant rules.

use crate::flags::{LockFlags, UnlockFlags};
use crate::limits::{Limit, Limits, RESOURCE_NAME_LEN_MAX};
use crate::lockspace::Lockspace;
use crate::mode::{LvbAction, Mode};
use crate::request::{ConvertRequest, LockRequest, RequestError, UnlockRequest};

impl Lockspace {
    pub(crate) fn validate_lock(&self, limits: &Limits, req: &LockRequest) -> Result<(), RequestError> {
        validate_name(&req.name)?;
        validate_lock_flags(req.mode, req.flags)?;
        check_timeout(limits, req.timeout)
    }

    pub(crate) fn validate_convert(
        &self,
        limits: &Limits,
        from: Mode,
        req: &ConvertRequest,
    ) -> Result<(), RequestError> {
        validate_convert_flags(from, req.mode, req.flags)?;
        check_timeout(limits, req.timeout)?;
        self.validate_lvb(req.lvb.as_deref(), req.flags.contains(LockFlags::VALBLK))?;
        let writes = Mode::lvb_action(Some(from), req.mode) == LvbAction::Write;
        if req.flags.contains(LockFlags::VALBLK)
            && writes
            && req.lvb.is_none()
            && !req.flags.contains(LockFlags::IVVALBLK)
        {
            return Err(RequestError::InvalidFlags("VALBLK converting down from PW/EX needs the value block to write"));
        }
        Ok(())
    }

    pub(crate) fn validate_unlock(&self, req: &UnlockRequest) -> Result<(), RequestError> {
        self.validate_lvb(req.lvb.as_deref(), req.flags.contains(UnlockFlags::VALBLK))
    }

    pub(super) fn validate_lvb(&self, lvb: Option<&[u8]>, valblk: bool) -> Result<(), RequestError> {
        let Some(lvb) = lvb else { return Ok(()) };
        if !valblk {
            return Err(RequestError::InvalidFlags("a value block needs VALBLK"));
        }
        if lvb.len() > self.config.lvb_len {
            return Err(RequestError::LvbTooLong { len: lvb.len(), max: self.config.lvb_len });
        }
        Ok(())
    }
}

pub(super) fn validate_name(name: &[u8]) -> Result<(), RequestError> {
    if name.is_empty() || name.len() > RESOURCE_NAME_LEN_MAX {
        return Err(RequestError::InvalidResourceName { len: name.len() });
    }
    Ok(())
}

pub(super) fn check_timeout(limits: &Limits, timeout: Option<std::time::Duration>) -> Result<(), RequestError> {
    match timeout {
        Some(t) if t > limits.request_timeout_max => Err(RequestError::LimitExceeded(Limit::RequestTimeout)),
        _ => Ok(()),
    }
}

/// Flag rules shared by new requests and conversions.
pub(super) fn validate_common_flags(flags: LockFlags) -> Result<(), RequestError> {
    if flags.contains(LockFlags::NOQUEUEBAST) && !flags.contains(LockFlags::NOQUEUE) {
        return Err(RequestError::InvalidFlags("NOQUEUEBAST goes with NOQUEUE"));
    }
    if flags.contains(LockFlags::ALTPR | LockFlags::ALTCW) {
        return Err(RequestError::InvalidFlags("ALTPR and ALTCW exclude each other"));
    }
    Ok(())
}

pub(super) fn validate_lock_flags(mode: Mode, flags: LockFlags) -> Result<(), RequestError> {
    validate_common_flags(flags)?;
    if flags.intersects(LockFlags::QUECVT | LockFlags::CONVDEADLK | LockFlags::IVVALBLK) {
        return Err(RequestError::InvalidFlags("QUECVT, CONVDEADLK and IVVALBLK apply to conversions"));
    }
    if flags.contains(LockFlags::EXPEDITE) {
        if mode != Mode::Nl {
            return Err(RequestError::InvalidFlags("EXPEDITE is for NL requests"));
        }
        if flags.intersects(LockFlags::NOQUEUE | LockFlags::HEADQUE | LockFlags::NOORDER) {
            return Err(RequestError::InvalidFlags(
                "EXPEDITE never queues: NOQUEUE, HEADQUE, NOORDER make no sense with it",
            ));
        }
    }
    let adopt_compatible = LockFlags::ADOPT | LockFlags::VALBLK | LockFlags::PERSISTENT;
    if flags.contains(LockFlags::ADOPT) && !adopt_compatible.contains(flags) {
        return Err(RequestError::InvalidFlags("ADOPT goes only with VALBLK and PERSISTENT"));
    }
    Ok(())
}

pub(super) fn validate_convert_flags(from: Mode, to: Mode, flags: LockFlags) -> Result<(), RequestError> {
    validate_common_flags(flags)?;
    if flags.intersects(LockFlags::EXPEDITE | LockFlags::ADOPT) {
        return Err(RequestError::InvalidFlags("EXPEDITE and ADOPT apply to new requests"));
    }
    if flags.contains(LockFlags::CONVDEADLK | LockFlags::NOQUEUE) {
        return Err(RequestError::InvalidFlags("CONVDEADLK and NOQUEUE exclude each other"));
    }
    if flags.contains(LockFlags::QUECVT) && !from.quecvt_allowed(to) {
        return Err(RequestError::QuecvtNotAllowed { from, to });
    }
    Ok(())
}
