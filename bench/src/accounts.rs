//! `starling-bench register`: creates benchmark accounts through the real
//! one-time-code flow (RequestOtp, the code read from the dev sender's
//! `<data>/otp.log`, VerifyOtp) and saves their tokens for the load
//! subcommands, which then authenticate with `Hello{access_token}`.
//!
//! The server rate-limits codes per identifier and per client IP (default
//! 30 per IP per hour); registration spreads its connections over
//! 127.0.0.x source addresses, and a benchmark server should raise
//! `accounts.otp_requests_per_ip_per_hour` and `accounts.access_token_ttl_ms`
//! in its config file (see `bench/compare.sh`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use starling_protocol::v1::{self, frame::Body};

use crate::clock::Stopwatch;
use crate::net::{StarlingConn, Stream, Target, describe_error, source_addr, tls_for};
use crate::report;

/// One registered account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) email: String,
    pub(crate) user_id: u64,
    pub(crate) device_id: u32,
    pub(crate) access_token: String,
    pub(crate) access_expires_at_ms: u64,
    pub(crate) refresh_token: String,
}

/// The accounts file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AccountsFile {
    pub(crate) accounts: Vec<Account>,
}

impl AccountsFile {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading accounts file {}", path.display()))?;
        let f: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing accounts file {}", path.display()))?;
        let now_ms = crate::clock::unix_secs() * 1000;
        if let Some(a) = f
            .accounts
            .iter()
            .find(|a| a.access_expires_at_ms < now_ms + 60_000)
        {
            bail!(
                "the access token of {} in {} has expired (or expires within a minute): run \
                 `starling-bench register` again (and give the server a longer \
                 accounts.access_token_ttl_ms)",
                a.email,
                path.display()
            );
        }
        Ok(f)
    }

    /// At least `n` accounts, or a clear error.
    pub(crate) fn need(&self, n: usize, path: &Path) -> anyhow::Result<()> {
        if self.accounts.len() < n {
            bail!(
                "{} holds {} accounts but this run needs {n}: run `starling-bench register --count {n}`",
                path.display(),
                self.accounts.len()
            );
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// Starling server: tls://IP:PORT or plain://IP:PORT.
    #[arg(long, default_value = "tls://127.0.0.1:7443")]
    target: String,
    /// CA certificate for TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory (its `otp.log` holds the codes).
    #[arg(long)]
    data_dir: PathBuf,
    /// Accounts to have in the file (existing ones are kept).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Accounts file to write.
    #[arg(long, default_value = "bench-accounts.json")]
    out: PathBuf,
    /// Registrations in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// E-mail prefix: accounts are PREFIX-N@bench.example.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Source addresses to spread connections over (127.0.0.2 ..).
    #[arg(long, default_value_t = 200)]
    sources: u32,
}

/// Codes seen in `otp.log`, read incrementally.
#[derive(Debug, Default)]
struct OtpLog {
    path: PathBuf,
    offset: u64,
    codes: HashMap<String, String>,
}

impl OtpLog {
    fn refresh(&mut self) -> anyhow::Result<()> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Ok(());
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        // Only whole lines.
        let end = s.rfind('\n').map_or(0, |i| i + 1);
        for line in s[..end].lines() {
            if let Some((ident, code)) = line.rsplit_once(' ') {
                self.codes.insert(ident.to_owned(), code.to_owned());
            }
        }
        self.offset += end as u64;
        Ok(())
    }
}

/// Registers accounts (as `register` does, with its defaults) until `out` holds `count` with
/// valid tokens: what a load subcommand given the server's data directory does first.
pub(crate) fn top_up(
    target: &str,
    ca: Option<&Path>,
    data_dir: &Path,
    count: usize,
    out: &Path,
) -> anyhow::Result<()> {
    run(&RegisterArgs {
        target: target.to_owned(),
        ca: ca.map(Path::to_path_buf),
        data_dir: data_dir.to_path_buf(),
        count,
        out: out.to_path_buf(),
        concurrency: 16,
        prefix: "bench".to_owned(),
        sources: 200,
    })
}

pub(crate) fn run(args: &RegisterArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    anyhow::ensure!(
        !target.is_mqtt(),
        "register talks to Starling (tls:// or plain://)"
    );
    let tls = tls_for(&target, args.ca.as_deref(), Some(&args.data_dir), false)?;
    let mut file = if args.out.exists() {
        AccountsFile::load(&args.out).unwrap_or_default()
    } else {
        AccountsFile::default()
    };
    let have = file.accounts.len();
    if have >= args.count {
        println!("{} already holds {have} accounts", args.out.display());
        return Ok(());
    }
    let todo: Vec<usize> = (have..args.count).collect();
    let otp = Rc::new(RefCell::new(OtpLog {
        path: args.data_dir.join("otp.log"),
        ..OtpLog::default()
    }));
    let sw = Stopwatch::start();
    let made = crate::workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(register_all(args, target, tls, todo, otp, sw))
            .await
    })??;
    file.accounts.extend(made);
    file.accounts.sort_by_key(|a| a.user_id);
    report::write_json(&args.out, &file)?;
    println!(
        "registered {} accounts in {:.1} s ({} in the file)",
        args.count - have,
        sw.elapsed_secs(),
        file.accounts.len()
    );
    Ok(())
}

async fn register_all(
    args: &RegisterArgs,
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    todo: Vec<usize>,
    otp: Rc<RefCell<OtpLog>>,
    sw: Stopwatch,
) -> anyhow::Result<Vec<Account>> {
    let total = todo.len();
    let queue = Rc::new(RefCell::new(todo.into_iter()));
    let done = Rc::new(RefCell::new(Vec::with_capacity(total)));
    let mut tasks = Vec::new();
    for lane in 0..args.concurrency.max(1) {
        let queue = queue.clone();
        let done = done.clone();
        let otp = otp.clone();
        let tls = tls.clone();
        let target = target.clone();
        let prefix = args.prefix.clone();
        let src = source_addr(lane as u64, args.sources, target.addr());
        tasks.push(tokio::task::spawn_local(async move {
            let stream =
                Stream::connect(target.addr(), src, tls.as_ref(), Duration::from_secs(10)).await?;
            let mut c = StarlingConn::new(stream);
            c.hello(None).await?;
            loop {
                let Some(i) = queue.borrow_mut().next() else {
                    return anyhow::Ok(());
                };
                let email = format!("{prefix}-{i}@bench.example");
                let acc = register_one(&mut c, &email, &otp).await?;
                done.borrow_mut().push(acc);
            }
        }));
    }
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = done.borrow().len();
        if n != last {
            last = n;
        }
        report::progress(&format!(
            "register: {n}/{total} accounts, {:.0}/s",
            n as f64 / sw.elapsed_secs().max(1e-3)
        ));
        if tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
    }
    report::progress_done();
    for t in tasks {
        t.await.context("registration task panicked")??;
    }
    Ok(std::mem::take(&mut *done.borrow_mut()))
}

async fn register_one(
    c: &mut StarlingConn,
    email: &str,
    otp: &Rc<RefCell<OtpLog>>,
) -> anyhow::Result<Account> {
    let ident = Some(v1::Identifier {
        kind: Some(v1::identifier::Kind::Email(email.to_owned())),
    });
    // Forget codes from earlier runs: only a code logged after this request counts.
    {
        let mut log = otp.borrow_mut();
        log.refresh()?;
        log.codes.remove(email);
    }
    match c
        .request(Body::RequestOtp(v1::RequestOtp {
            identifier: ident.clone(),
        }))
        .await?
    {
        Body::OtpSent(_) => {}
        Body::Error(e) if e.code == v1::ErrorCode::RateLimited as i32 => bail!(
            "RequestOtp for {email} was rate limited ({}); raise \
             accounts.otp_requests_per_ip_per_hour / otp_requests_per_identifier_per_hour in the \
             server's config file, or use more --sources",
            describe_error(&e)
        ),
        Body::Error(e) => bail!("RequestOtp for {email}: {}", describe_error(&e)),
        other => bail!("unexpected answer to RequestOtp: {}", other.kind().name()),
    }
    let mut code = None;
    for _ in 0..200 {
        code = {
            let mut log = otp.borrow_mut();
            log.refresh()?;
            log.codes.remove(email)
        };
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(code) = code else {
        bail!("no code for {email} appeared in otp.log within 2 s (is --data-dir the server's?)");
    };
    match c
        .request(Body::VerifyOtp(v1::VerifyOtp {
            identifier: ident,
            code,
            device: Some(v1::DeviceInfo {
                name: "bench".to_owned(),
                platform: "starling-bench".to_owned(),
            }),
            display_name: email.to_owned(),
        }))
        .await?
    {
        Body::SessionGranted(g) => Ok(Account {
            email: email.to_owned(),
            user_id: g.user_id,
            device_id: g.device_id,
            access_token: g.access_token,
            access_expires_at_ms: g.access_expires_at_ms,
            refresh_token: g.refresh_token,
        }),
        Body::Error(e) => bail!("VerifyOtp for {email}: {}", describe_error(&e)),
        other => bail!("unexpected answer to VerifyOtp: {}", other.kind().name()),
    }
}
