//! The `[access]` section: who administers the agent, and who may lock and
//! dump in each lockspace. What the file leaves out keeps its default
//! ([`Policy::default`]): a lockspace's rule replaces that lockspace's
//! default whole.
//!
//! ```toml
//! [access]
//! admins = ["uid:0", "group:dlmadmin"]
//! [access.lockspace.default]
//! lock = ["*"]
//! [access.lockspace.app]
//! lock = ["group:app", "cert:app.example.com"]
//! dump = ["group:app"]
//! [access.lockspace."*"]      # every lockspace without a rule of its own
//! lock = ["local"]
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::access::{Policy, Principal, Rule};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAccess {
    admins: Option<Vec<String>>,
    #[serde(default)]
    lockspace: BTreeMap<String, FileRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    #[serde(default)]
    lock: Vec<String>,
    #[serde(default)]
    dump: Vec<String>,
}

fn principals(key: &'static str, texts: &[String]) -> Result<Vec<Principal>, ConfigError> {
    texts.iter().map(|t| Principal::parse(t).map_err(|m| invalid(key, m))).collect()
}

/// The default policy with what `file` says over it.
pub(super) fn policy(file: FileAccess) -> Result<Policy, ConfigError> {
    let mut policy = Policy::default();
    if let Some(admins) = file.admins {
        policy.admins = principals("access.admins", &admins)?;
    }
    for (name, rule) in file.lockspace {
        let rule = Rule {
            lock: principals("access.lockspace.lock", &rule.lock)?,
            dump: principals("access.lockspace.dump", &rule.dump)?,
        };
        policy.lockspaces.insert(name, rule);
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::OTHER_LOCKSPACES;

    #[test]
    fn the_file_replaces_what_it_names_and_keeps_the_rest() {
        let file: FileAccess = toml::from_str(
            "admins = [\"gid:10\"]\n[lockspace.app]\nlock = [\"uid:1000\", \"local\"]\n[lockspace.\"*\"]\ndump = [\"*\"]\n",
        )
        .expect("parses");
        let parsed = policy(file).expect("valid");
        assert_eq!(parsed.admins, vec![Principal::Gid(10)]);
        assert_eq!(parsed.lockspaces["app"].lock, vec![Principal::Uid(1000), Principal::Local]);
        assert_eq!(parsed.lockspaces[OTHER_LOCKSPACES], Rule { lock: vec![], dump: vec![Principal::Anyone] });
        assert_eq!(parsed.lockspaces["default"], Policy::default().lockspaces["default"]);
        let bad: FileAccess = toml::from_str("[lockspace.app]\nlock = [\"user:nobody-at-all\"]\n").expect("parses");
        let error = policy(bad).expect_err("unknown user").to_string();
        assert!(error.contains("access.lockspace.lock") && error.contains("no such user"), "{error}");
        assert!(toml::from_str::<FileAccess>("[lockspace.app]\nwrite = []\n").is_err());
    }
}
