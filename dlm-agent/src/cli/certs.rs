//! `dlm-agent certs`: a cluster's own CA and certificates, for a test or a
//! small cluster (a production one may use its own CA: the agent reads PEM
//! files).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Options of `dlm-agent certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// The directory of the CA (ca.pem, ca.key: made if missing) and of the certificates issued
    #[arg(long, default_value = "/etc/dlm/pki")]
    dir: PathBuf,
    /// The name a new CA gets
    #[arg(long, default_value = "dlm cluster CA")]
    ca_name: String,
    /// The DNS names to issue a certificate for (NAME.pem and NAME.key): members' tls_name
    /// (node<ID> by default), and clients' names for cert:NAME in [access]
    #[arg(required = true)]
    names: Vec<String>,
}

/// Runs `dlm-agent certs`.
pub fn run(args: &CertsArgs) -> ExitCode {
    let ca = match dlm_agent::pki::Authority::open_or_create(&args.dir, &args.ca_name) {
        Ok(ca) => ca,
        Err(error) => {
            eprintln!("dlm-agent: the CA: {error}");
            return ExitCode::from(super::EXIT_SOFTWARE);
        }
    };
    println!("CA {}", ca.certificate().display());
    for name in &args.names {
        match ca.issue(name) {
            Ok((cert, key)) => println!("{name}: {} {}", cert.display(), key.display()),
            Err(error) => {
                eprintln!("dlm-agent: {error}");
                return ExitCode::from(super::EXIT_USAGE);
            }
        }
    }
    ExitCode::SUCCESS
}
