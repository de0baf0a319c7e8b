//! Who may do what: the agent's access policy, per lockspace.
//!
//! A client is known by what its connection proves ([`Identity`]): on the
//! Unix socket its uid and groups (`SO_PEERCRED`, and the groups of the
//! process that connected), on TCP the certificate it presented, if any. A
//! right is given to a list of [`Principal`]s:
//!
//! | right | what it allows | default |
//! |---|---|---|
//! | `lock` | lock requests in the lockspace (conversions, unlocks and cancels act on the session's own locks) | anyone in `default`; administrators elsewhere |
//! | `dump` | the `Dump` call, which shows every client's locks, pids, uids and value blocks | administrators |
//! | `admin` | create and release lockspaces (with `force` too), `fence-ack`; every right in every lockspace | uid 0 and the agent's own uid |
//!
//! A request refused gets the typed code `permission_denied` and changes
//! nothing; refusals are counted in `dlm_access_denied_total{right}`.
//! `Status` and `Lockspaces` show no other client's details and are open to
//! every client.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};

use crate::codes::Right;

/// What a client's connection proves about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// On the Unix socket: the client's uid.
    pub uid: Option<u32>,
    /// On the Unix socket: its primary and supplementary groups.
    pub gids: Vec<u32>,
    /// On TCP with TLS: the certificate it presented (checked against the
    /// cluster's CA by the handshake).
    pub certificate: Option<Arc<CertificateDer<'static>>>,
}

impl Identity {
    /// A Unix-socket client: `uid` and `gid` from `SO_PEERCRED`, and the
    /// supplementary groups of process `pid` (read now, while the process
    /// that connected is there; it has no others to claim).
    #[must_use]
    pub fn local(uid: u32, gid: u32, pid: Option<i32>) -> Identity {
        let mut gids = vec![gid];
        if let Some(pid) = pid
            && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:"))
        {
            gids.extend(line.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        }
        gids.sort_unstable();
        gids.dedup();
        Identity { uid: Some(uid), gids, certificate: None }
    }

    /// Who this is, for a log line or a refusal's message.
    #[must_use]
    pub fn describe(&self) -> String {
        match (self.uid, &self.certificate) {
            (Some(uid), _) => format!("uid {uid}"),
            (None, Some(_)) => "a TCP client with a certificate".into(),
            (None, None) => "a TCP client without a certificate".into(),
        }
    }
}

/// Whom a right is given to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Every client, on either socket, with or without a certificate.
    Anyone,
    /// Every client on the Unix socket (every local user).
    Local,
    /// A local user.
    Uid(u32),
    /// The members of a local group.
    Gid(u32),
    /// A TCP client whose certificate is valid for this DNS name.
    Certificate(String),
}

impl Principal {
    /// Parses `*`, `local`, `uid:N`, `user:NAME`, `gid:N`, `group:NAME` or
    /// `cert:NAME`; names of users and groups are looked up now, in
    /// `/etc/passwd` and `/etc/group`.
    ///
    /// # Errors
    /// A message saying what is expected, or that the name is unknown.
    pub fn parse(text: &str) -> Result<Principal, String> {
        let number = |n: &str| n.parse::<u32>().map_err(|_| format!("{text:?}: {n:?} is not a number"));
        match text.split_once(':') {
            None if text == "*" => Ok(Principal::Anyone),
            None if text == "local" => Ok(Principal::Local),
            Some(("uid", n)) => number(n).map(Principal::Uid),
            Some(("gid", n)) => number(n).map(Principal::Gid),
            Some(("user", name)) => {
                id_of("/etc/passwd", name).map(Principal::Uid).ok_or_else(|| format!("{text:?}: no such user"))
            }
            Some(("group", name)) => {
                id_of("/etc/group", name).map(Principal::Gid).ok_or_else(|| format!("{text:?}: no such group"))
            }
            Some(("cert", name)) if ServerName::try_from(name).is_ok() => Ok(Principal::Certificate(name.into())),
            _ => Err(format!("{text:?} is not one of *, local, uid:N, user:NAME, gid:N, group:NAME, cert:DNS-NAME")),
        }
    }

    fn matches(&self, who: &Identity) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Local => who.uid.is_some(),
            Principal::Uid(uid) => who.uid == Some(*uid),
            Principal::Gid(gid) => who.uid.is_some() && who.gids.contains(gid),
            Principal::Certificate(name) => who.certificate.as_deref().is_some_and(|cert| names(cert, name)),
        }
    }
}

/// Whether `cert` is valid for the DNS name `name` (its subjectAltNames).
#[must_use]
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let (Ok(cert), Ok(name)) = (webpki::EndEntityCert::try_from(cert), ServerName::try_from(name)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The id of `name` in a passwd- or group-format file (name:x:id:…).
fn id_of(file: &str, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
    })
}

/// The rights in one lockspace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Who may lock.
    pub lock: Vec<Principal>,
    /// Who may dump.
    pub dump: Vec<Principal>,
}

/// The lockspace name whose rule applies to lockspaces without their own.
pub const OTHER_LOCKSPACES: &str = "*";

/// The agent's access policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Who administers the agent (and has every right everywhere).
    pub admins: Vec<Principal>,
    /// Rules by lockspace name; [`OTHER_LOCKSPACES`] for the rest.
    pub lockspaces: BTreeMap<String, Rule>,
}

impl Default for Policy {
    fn default() -> Policy {
        let mut admins = vec![Principal::Uid(0)];
        let own = std::fs::metadata("/proc/self").map_or(0, |m| std::os::unix::fs::MetadataExt::uid(&m));
        if own != 0 {
            admins.push(Principal::Uid(own));
        }
        let mut lockspaces = BTreeMap::new();
        lockspaces.insert("default".into(), Rule { lock: vec![Principal::Anyone], dump: Vec::new() });
        lockspaces.insert(OTHER_LOCKSPACES.into(), Rule::default());
        Policy { admins, lockspaces }
    }
}

impl Policy {
    /// Whether `who` has `right` in `lockspace` (ignored for `admin`).
    #[must_use]
    pub fn allows(&self, who: &Identity, right: Right, lockspace: &str) -> bool {
        if self.admins.iter().any(|p| p.matches(who)) {
            return true;
        }
        let Some(rule) = self.lockspaces.get(lockspace).or_else(|| self.lockspaces.get(OTHER_LOCKSPACES)) else {
            return false;
        };
        let given = match right {
            Right::Lock => &rule.lock,
            Right::Dump => &rule.dump,
            Right::Admin => return false,
        };
        given.iter().any(|p| p.matches(who))
    }

    /// The configuration key that gives `right` in `lockspace`, for a
    /// refusal's message.
    #[must_use]
    pub fn key_for(&self, right: Right, lockspace: &str) -> String {
        let name = if self.lockspaces.contains_key(lockspace) { lockspace } else { OTHER_LOCKSPACES };
        match right {
            Right::Admin => "access.admins".into(),
            _ => format!("access.lockspace.{name:?}.{right}"),
        }
    }
}

/// The policy, with the count of what it refused.
pub struct Access {
    /// The policy.
    pub policy: Policy,
    denied: prometheus::IntCounterVec,
}

impl Access {
    /// `policy`, counting refusals in `dlm_access_denied_total{right}` (to
    /// be registered by the caller: [`Access::collector`]).
    ///
    /// # Panics
    /// Never: the metric's name and labels are valid.
    #[must_use]
    pub fn new(policy: Policy) -> Access {
        let denied = prometheus::IntCounterVec::new(
            prometheus::Opts::new("dlm_access_denied_total", "Requests refused as permission_denied, by right"),
            &["right"],
        )
        .expect("valid metric");
        for right in Right::ALL {
            denied.with_label_values(&[right.as_str()]);
        }
        Access { policy, denied }
    }

    /// The refusal counter, to register.
    #[must_use]
    pub fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.denied.clone())
    }

    /// `Ok` if `who` has `right` in `lockspace`; else the refusal's message,
    /// counted.
    ///
    /// # Errors
    /// The right is not given: a message naming who, what, and the key that gives it.
    pub fn check(&self, who: &Identity, right: Right, lockspace: &str) -> Result<(), String> {
        if self.policy.allows(who, right, lockspace) {
            return Ok(());
        }
        self.denied.with_label_values(&[right.as_str()]).inc();
        let what = match right {
            Right::Admin => "administer the agent".to_string(),
            _ => format!("{right} in lockspace {lockspace:?}"),
        };
        Err(format!("{} may not {what} (see {})", who.describe(), self.policy.key_for(right, lockspace)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(uid: u32, gids: &[u32]) -> Identity {
        Identity { uid: Some(uid), gids: gids.to_vec(), certificate: None }
    }

    #[test]
    fn principals_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(Principal::parse("*"), Ok(Principal::Anyone));
        assert_eq!(Principal::parse("local"), Ok(Principal::Local));
        assert_eq!(Principal::parse("uid:1000"), Ok(Principal::Uid(1000)));
        assert_eq!(Principal::parse("gid:27"), Ok(Principal::Gid(27)));
        assert_eq!(Principal::parse("user:root"), Ok(Principal::Uid(0)));
        assert_eq!(Principal::parse("group:root"), Ok(Principal::Gid(0)));
        assert_eq!(Principal::parse("cert:app.example"), Ok(Principal::Certificate("app.example".into())));
        assert!(Principal::parse("user:no-such-user-here").unwrap_err().contains("no such user"));
        assert!(Principal::parse("uid:x").unwrap_err().contains("not a number"));
        assert!(Principal::parse("everyone").unwrap_err().contains("uid:N"));
        assert!(Principal::parse("cert:not a name").is_err());
    }

    #[test]
    fn the_default_lets_anyone_lock_in_default_and_only_administrators_do_the_rest() {
        let policy = Policy::default();
        let nobody = local(65534, &[65534]);
        let anonymous = Identity::default();
        let root = local(0, &[0]);
        for who in [&nobody, &anonymous] {
            assert!(policy.allows(who, Right::Lock, "default"));
            assert!(!policy.allows(who, Right::Dump, "default"));
            assert!(!policy.allows(who, Right::Lock, "app"));
            assert!(!policy.allows(who, Right::Admin, ""));
        }
        for right in Right::ALL {
            assert!(policy.allows(&root, *right, "app"));
        }
    }

    #[test]
    fn rules_give_rights_by_uid_group_socket_and_certificate() {
        let mut policy = Policy { admins: vec![Principal::Gid(10)], lockspaces: BTreeMap::new() };
        policy.lockspaces.insert(
            "app".into(),
            Rule { lock: vec![Principal::Uid(1000), Principal::Gid(20)], dump: vec![Principal::Local] },
        );
        policy.lockspaces.insert(OTHER_LOCKSPACES.into(), Rule { lock: vec![Principal::Local], dump: vec![] });
        assert!(policy.allows(&local(1000, &[1000]), Right::Lock, "app"));
        assert!(policy.allows(&local(1001, &[1001, 20]), Right::Lock, "app"));
        assert!(!policy.allows(&local(1001, &[1001]), Right::Lock, "app"));
        assert!(policy.allows(&local(1001, &[1001]), Right::Dump, "app"));
        assert!(!policy.allows(&Identity::default(), Right::Dump, "app"));
        assert!(policy.allows(&local(1001, &[1001]), Right::Lock, "other"));
        assert!(!policy.allows(&Identity::default(), Right::Lock, "other"));
        assert!(policy.allows(&local(5, &[10]), Right::Admin, ""));
        assert!(!policy.allows(&local(0, &[0]), Right::Admin, ""), "root is an administrator only if listed");
        assert_eq!(policy.key_for(Right::Lock, "app"), "access.lockspace.\"app\".lock");
        assert_eq!(policy.key_for(Right::Dump, "zzz"), "access.lockspace.\"*\".dump");
    }

    #[test]
    fn refusals_are_counted_by_right_and_name_the_key() {
        let access = Access::new(Policy::default());
        let nobody = local(65534, &[65534]);
        let error = access.check(&nobody, Right::Dump, "default").unwrap_err();
        assert_eq!(error, "uid 65534 may not dump in lockspace \"default\" (see access.lockspace.\"default\".dump)");
        assert!(access.check(&nobody, Right::Lock, "default").is_ok());
        assert!(access.check(&nobody, Right::Admin, "").unwrap_err().contains("access.admins"));
        assert_eq!(access.denied.with_label_values(&["dump"]).get(), 1);
        assert_eq!(access.denied.with_label_values(&["admin"]).get(), 1);
        assert_eq!(access.denied.with_label_values(&["lock"]).get(), 0);
    }

    #[test]
    fn a_process_groups_are_read_from_proc() {
        let me = Identity::local(0, 0, Some(i32::try_from(std::process::id()).expect("pid")));
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status.lines().find_map(|l| l.strip_prefix("Groups:")).expect("groups line");
        for gid in line.split_whitespace() {
            assert!(me.gids.contains(&gid.parse().expect("gid")), "{gid} in {:?}", me.gids);
        }
        assert_eq!(Identity::local(7, 8, None).gids, vec![8]);
    }
}
