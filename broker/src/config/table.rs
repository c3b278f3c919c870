//! Every setting berth reads, with its default and meaning: the one list that `--help`, docs/settings.md and
//! deploy/berth.example.toml are made or checked from. Tests hold it to [`super::Settings`]: the same names as
//! the struct's fields, and defaults that are the struct's real defaults. A new field needs a row here.

use DefaultValue::{Fallback, Unset, Value};

/// One setting: its environment name (the config file key is the same in lower case).
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub default: DefaultValue,
    pub read_by: ReadBy,
    /// Credentials: read from the environment or the config file only, never from a flag (a command line is
    /// visible to every user of the machine through `ps`).
    pub secret: bool,
    pub meaning: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// The struct's default, written the way the setting would be given.
    Value(&'static str),
    /// Unset in the struct; the code then uses what this says.
    Fallback(&'static str),
    /// Unset, and nothing stands in for it (the feature is off).
    Unset,
}

impl DefaultValue {
    /// The default as `--help` and the docs show it.
    pub fn text(self) -> &'static str {
        match self {
            Value(text) | Fallback(text) => text,
            Unset => "unset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBy {
    Api,
    Worker,
    Both,
}

impl ReadBy {
    pub fn label(self) -> &'static str {
        match self {
            ReadBy::Api => "berth-api",
            ReadBy::Worker => "berth-worker",
            ReadBy::Both => "berth-api, berth-worker",
        }
    }
}

const fn api(name: &'static str, default: DefaultValue, meaning: &'static str) -> Setting {
    row(name, default, ReadBy::Api, meaning)
}
const fn worker(name: &'static str, default: DefaultValue, meaning: &'static str) -> Setting {
    row(name, default, ReadBy::Worker, meaning)
}
const fn both(name: &'static str, default: DefaultValue, meaning: &'static str) -> Setting {
    row(name, default, ReadBy::Both, meaning)
}
const fn row(
    name: &'static str,
    default: DefaultValue,
    read_by: ReadBy,
    meaning: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        read_by,
        secret: false,
        meaning,
    }
}

impl Setting {
    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

/// The settings in groups, each under a heading, in the order `--help` and the docs show them.
pub const GROUPS: &[(&str, &[Setting])] = &[
    ("API listener and requests", API),
    ("Database, keys and files", STORAGE),
    ("Workers", WORKERS),
    ("The `shared` plan", SHARED),
    ("The `local` engine, `dedicated` and `ha` plans", LOCAL),
    ("AWS (the SDK's standard chain)", AWS),
    ("The `ec2` engine", EC2),
    ("The `s3` plans", S3),
    ("Presets and backups", SNAPSHOTS),
    ("Connection delivery and webhooks", DELIVERY),
];

/// Every setting, group after group.
pub fn all() -> impl Iterator<Item = &'static Setting> {
    GROUPS.iter().flat_map(|(_, settings)| settings.iter())
}

/// The setting of that environment name.
pub fn find(name: &str) -> Option<&'static Setting> {
    all().find(|s| s.name == name)
}

const API: &[Setting] = &[
    api(
        "PORT",
        Value("8080"),
        "TCP port the API listens on (0: any free port).",
    ),
    api(
        "BIND_ADDRESS",
        Value("0.0.0.0"),
        "IP address the API listens on (the embedded default uses 127.0.0.1 unless this is given).",
    ),
    api(
        "BROKER_USERNAME",
        Unset,
        "HTTP basic-auth user platforms use; required outside the embedded default.",
    )
    .secret(),
    api(
        "BROKER_PASSWORD",
        Unset,
        "HTTP basic-auth password; required outside the embedded default.",
    )
    .secret(),
    api(
        "TLS_CERT_FILE",
        Unset,
        "PEM file with the API's certificate chain, leaf first; with TLS_KEY_FILE the API serves HTTPS \
         (docs/tls.md). Unset: plain HTTP.",
    ),
    api(
        "TLS_KEY_FILE",
        Unset,
        "PEM private key of the leaf certificate (PKCS#8, SEC1 EC or PKCS#1 RSA); set with TLS_CERT_FILE.",
    ),
    api(
        "TLS_RELOAD_SECS",
        Value("10"),
        "Seconds between checks of the TLS files; a changed pair serves new connections without a restart.",
    ),
    api(
        "HTTP_HEADER_READ_TIMEOUT_SECS",
        Value("10"),
        "Seconds a connection has to send a request's head, from its opening or its previous response \
         (so idle keep-alive connections close after it too).",
    ),
    api(
        "HTTP_MAX_CONNECTIONS",
        Value("1024"),
        "Most client connections open at once (kept below the open-file limit); at the cap a new one closes \
         the oldest idle one.",
    ),
    api(
        "MAX_BODY_BYTES",
        Value("262144"),
        "Largest accepted request body, in bytes.",
    ),
    api(
        "AUTH_FAILURE_LIMIT",
        Value("20"),
        "Failed basic-auth attempts one source address may make within AUTH_FAILURE_WINDOW_SECS before it \
         gets 429 until the window ends (0: no limit).",
    ),
    api(
        "AUTH_FAILURE_WINDOW_SECS",
        Value("60"),
        "The window of AUTH_FAILURE_LIMIT, in seconds.",
    ),
    api(
        "SYNC_WAIT_SECS",
        Value("20"),
        "How long a request without accepts_incomplete=true waits for its operation before a 504 (1 to 25: \
         below the 30 s request timeout).",
    ),
    api(
        "BROKER_PUBLIC_URL",
        Fallback("the scheme and Host of the request that asks for the link"),
        "The broker's address as browsers reach it, the base of dashboard_url links (docs/dashboard.md); \
         the embedded default sets its own.",
    ),
    api(
        "DASHBOARD_LINK_TTL_SECS",
        Value("2592000"),
        "How long a dashboard_url link stays good, in seconds (30 days); every GET of the instance answers \
         a fresh one.",
    ),
];

const STORAGE: &[Setting] = &[
    both(
        "DATABASE_URL",
        Fallback("the embedded default (a private Postgres under BERTH_DATA_DIR, API only)"),
        "The broker's own Postgres database, shared by the API and every worker.",
    )
    .secret(),
    both(
        "DATABASE_POOL_SIZE",
        Value("16"),
        "Database connections in the pool of each process.",
    ),
    both(
        "BERTH_DATA_DIR",
        Value(".berth"),
        "Folder of the embedded default's Postgres, keys and credentials, and of defaults derived from it.",
    ),
    both(
        "BERTH_KEY_FILE",
        Fallback("<BERTH_DATA_DIR>/master.key"),
        "File with the 32-byte key (base64) that seals secrets at rest (`berth-api gen-key PATH` writes one).",
    ),
    both(
        "BERTH_KEY_FILES",
        Fallback("BERTH_KEY_FILE alone"),
        "Comma list of key files that seal secrets at rest: the first seals, all of them open (key rotation, docs/keys.md). Setting it and BERTH_KEY_FILE is an error.",
    ),
    both(
        "PLANS_DIR",
        Value("plans"),
        "Folder with one catalog file per service.",
    ),
    both(
        "NAME_PREFIX",
        Value("berth_"),
        "Prefix of every name berth gives a resource (databases, roles, buckets).",
    ),
];

const WORKERS: &[Setting] = &[
    worker(
        "WORKER_CONCURRENCY",
        Value("8"),
        "Tasks one worker runs at once.",
    ),
    worker(
        "WORKER_PREFETCH",
        Value("1024"),
        "Most claimed tasks a worker keeps buffered beyond its running ones (only tasks quicker than a claim).",
    ),
    worker(
        "WORKER_LEASE_SECS",
        Value("30"),
        "Lease of a claimed task, renewed while it runs; a crashed worker's tasks return after it (at least 2).",
    ),
    worker(
        "WORKER_POLL_MS",
        Value("1000"),
        "Poll interval behind LISTEN/NOTIFY, in milliseconds.",
    ),
    worker(
        "WORKER_ID",
        Fallback("<HOSTNAME>-<pid>-<random>"),
        "Name of this worker in tasks.worker_id.",
    ),
    worker(
        "RECONCILE_INTERVAL_MS",
        Value("5000"),
        "How often a worker reconciles: restarts stopped local servers, deprovisions expired instances (at \
         least 100).",
    ),
    worker(
        "WORKER_HTTP_ADDR",
        Unset,
        "host:port where a worker serves /health and /metrics, without credentials (unset: none); each worker on \
         a machine needs its own port.",
    ),
    worker(
        "EVENT_RETENTION_DAYS",
        Value("90"),
        "Days an instance's audit trail (/berth/v1/instances/{id}/events) is kept after the instance is gone.",
    ),
    both(
        "LOG_FORMAT",
        Value("text"),
        "Log lines as `text` or `json` (one JSON object a line; fields in docs/observability.md).",
    ),
    worker(
        "BACKUP_SCHEDULER_MS",
        Value("1000"),
        "How often a worker looks for due scheduled backups.",
    ),
    both(
        "POOL_TARGETS",
        Fallback(
            "unset: no pools (the embedded default: `dedicated=2,ha=1`, the `ha` pool where etcd and Patroni are installed)",
        ),
        "Warm pools: items each plan keeps made ahead of time, as `plan=count` pairs separated by commas (plan \
         name or id), e.g. `shared=4,dedicated=2`; `plan/preset=count` keeps clones of a preset's newest version \
         (`plan/preset@version=count`: of that version), e.g. `shared/orders-demo=1`. A provision the pool can \
         serve takes one (docs/pools.md). An `ec2` plan, and the `ha` plan with `HA_ENGINE=ec2`, are pooled only when \
         named here: each item is a running VM (an `ha` item three).",
    ),
    worker(
        "POOL_MAX_AGE_SECS",
        Value("86400"),
        "Seconds a pooled item may wait for a provision before it is removed and made again.",
    ),
    worker(
        "POOL_CHECK_MS",
        Value("1000"),
        "How often a worker checks the pools: fills them, recycles old items, drains plans whose target fell.",
    ),
];

const SHARED: &[Setting] = &[
    both(
        "SHARED_POSTGRES_URL",
        Fallback("unset (the embedded default: its own Postgres)"),
        "Admin URL of the Postgres server that hosts `shared` plan databases; the plan is offered when set.",
    )
    .secret(),
    worker(
        "SHARED_POSTGRES_PUBLIC_HOST",
        Fallback("the host of SHARED_POSTGRES_URL"),
        "Host written into `shared` credentials, when apps reach the server under another name.",
    ),
    worker(
        "SHARED_POSTGRES_PUBLIC_PORT",
        Fallback("the port of SHARED_POSTGRES_URL"),
        "Port written into `shared` credentials.",
    ),
];

const LOCAL: &[Setting] = &[
    both(
        "LOCAL_ENGINE",
        Value("false"),
        "Serve plans on the `local` engine (a Postgres server per instance on the worker's machine); the \
         embedded default turns it on unless this is given.",
    ),
    worker(
        "LOCAL_SERVERS_DIR",
        Fallback("<BERTH_DATA_DIR>/servers"),
        "Where `local` instance servers live.",
    ),
    worker(
        "LOCAL_ENGINE_HOST",
        Fallback("the machine's host name"),
        "Name of this machine for the `local` engine: workers elsewhere leave its instances alone.",
    ),
    both(
        "DEDICATED_ENGINE",
        Value("local"),
        "Engine of the `dedicated` plan: local or ec2 (needs AWS settings).",
    ),
    both(
        "HA_ENGINE",
        Value("local"),
        "Engine of the `ha` plan: local (Patroni + etcd on the worker's machine) or ec2 (a VM per member).",
    ),
    worker(
        "HA_PATRONI_TTL",
        Fallback("7"),
        "Patroni ttl of new `ha` clusters, in seconds; loop_wait + 2 x retry_timeout must not exceed it.",
    ),
    worker(
        "HA_PATRONI_LOOP_WAIT",
        Fallback("1"),
        "Patroni loop_wait of new `ha` clusters, in seconds.",
    ),
    worker(
        "HA_PATRONI_RETRY_TIMEOUT",
        Fallback("3"),
        "Patroni retry_timeout of new `ha` clusters, in seconds.",
    ),
];

const AWS: &[Setting] = &[
    both(
        "AWS_REGION",
        Unset,
        "AWS region; with a credential source it enables the `ec2` engine and, without an S3-compatible \
         store, the `s3` plans.",
    ),
    both("AWS_ACCESS_KEY_ID", Unset, "AWS access key id.").secret(),
    worker("AWS_SECRET_ACCESS_KEY", Unset, "AWS secret access key.").secret(),
    worker(
        "AWS_SESSION_TOKEN",
        Unset,
        "AWS session token of temporary credentials.",
    )
    .secret(),
    both(
        "AWS_PROFILE",
        Unset,
        "Profile of the AWS shared config and credentials files.",
    ),
    both(
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        Unset,
        "Web identity token file (EKS IRSA and the like).",
    ),
    both(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        Unset,
        "Container credentials endpoint (ECS, EKS Pod Identity).",
    ),
    both(
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        Unset,
        "Container credentials path (ECS).",
    ),
    worker(
        "AWS_ENDPOINT_URL",
        Unset,
        "Another endpoint for every AWS service (moto, LocalStack); apps get it as S3_ENDPOINT.",
    ),
];

const EC2: &[Setting] = &[
    worker(
        "EC2_AMI_X86_64",
        Fallback("the newest Debian 12 image"),
        "AMI (Debian 12 or Ubuntu, cloud-init) for x86_64 instances.",
    ),
    worker(
        "EC2_AMI_ARM64",
        Fallback("the newest Debian 12 image"),
        "AMI for arm64 instances.",
    ),
    worker(
        "EC2_SUBNET_IDS",
        Fallback("the default VPC's subnets"),
        "Comma list of subnets berth may launch into (one per availability zone used).",
    ),
    worker(
        "EC2_ALLOWED_CIDR",
        Value("0.0.0.0/0"),
        "Who may reach port 5432 (and 22 with ssh_keys).",
    ),
    worker(
        "EC2_ON_DEMAND_PRICES_FILE",
        Fallback("the list shipped in the worker (us-east-1 Linux prices)"),
        "JSON file {\"m6g.large\": 0.077, ...}: on-demand USD/hour per instance type.",
    ),
    worker(
        "EC2_OFFERS_TTL_SECS",
        Value("3600"),
        "How old cached instance types and prices may be before a worker refreshes them.",
    ),
    worker(
        "EC2_READINESS_PROBE",
        Value("true"),
        "Wait for Postgres to accept TLS connections before a VM counts as ready (off where nothing \
         listens, as under moto).",
    ),
];

const S3: &[Setting] = &[
    worker(
        "S3_KMS_KEY_ID",
        Fallback("SSE-S3 (AES256)"),
        "KMS key (id or ARN) for `encrypted` S3 plans on AWS.",
    ),
    both(
        "S3_COMPATIBLE_ENDPOINT",
        Unset,
        "An S3-compatible store (SeaweedFS, MinIO, Garage, R2) for the `s3` plans; wins over AWS.",
    ),
    both(
        "S3_COMPATIBLE_ACCESS_KEY",
        Unset,
        "Admin access key of the S3-compatible store.",
    )
    .secret(),
    both(
        "S3_COMPATIBLE_SECRET_KEY",
        Unset,
        "Admin secret key of the S3-compatible store.",
    )
    .secret(),
    worker(
        "S3_COMPATIBLE_REGION",
        Value("us-east-1"),
        "Region name the S3-compatible store expects.",
    ),
    both(
        "S3_COMPATIBLE_IAM_ENDPOINT",
        Fallback("bindings share the store's keys"),
        "The store's IAM-style identity API (SeaweedFS: its S3 endpoint): each binding gets a key of its own.",
    ),
];

const SNAPSHOTS: &[Setting] = &[
    worker(
        "SNAPSHOT_STORE_URL",
        Fallback("file://<BERTH_DATA_DIR>/snapshots"),
        "Where presets and backups are stored: file:///dir or s3://bucket/prefix.",
    ),
    worker(
        "SNAPSHOT_S3_ENDPOINT",
        Fallback("AWS S3"),
        "S3-compatible endpoint of an s3:// snapshot store.",
    ),
    worker(
        "SNAPSHOT_S3_ACCESS_KEY",
        Fallback("the AWS standard chain"),
        "Access key of an s3:// snapshot store.",
    )
    .secret(),
    worker(
        "SNAPSHOT_S3_SECRET_KEY",
        Unset,
        "Secret key of an s3:// snapshot store.",
    )
    .secret(),
    worker(
        "SNAPSHOT_S3_REGION",
        Fallback("AWS_REGION, else us-east-1"),
        "Region of an s3:// snapshot store.",
    ),
    worker(
        "SNAPSHOT_KEY_FILE",
        Fallback("<BERTH_DATA_DIR>/snapshot.key, made on first start"),
        "The key snapshots are sealed with (`berth gen-key` writes one); a configured file must exist.",
    ),
    worker(
        "SNAPSHOT_KEY_FILES",
        Fallback("SNAPSHOT_KEY_FILE alone"),
        "Comma list of snapshot key files: the first seals new presets and backups, all of them open (docs/keys.md). Setting it and SNAPSHOT_KEY_FILE is an error.",
    ),
    worker(
        "SNAPSHOT_ZSTD_LEVEL",
        Value("6"),
        "zstd level of snapshots (1 to 19).",
    ),
];

const DELIVERY: &[Setting] = &[
    worker(
        "CONNSTR_BUCKET",
        Unset,
        "Push each dedicated server's connection JSON {connstr, instance_name, ...} to this bucket.",
    ),
    worker(
        "CONNSTR_BUCKET_KEY",
        Value("berth/{instance_id}/connstr.json"),
        "Object key of that push; {instance_id} and {instance_name} are replaced.",
    ),
    worker(
        "CONNSTR_BUCKET_REGION",
        Fallback("AWS_REGION, else us-east-1"),
        "Region of CONNSTR_BUCKET.",
    ),
    worker(
        "CONNSTR_BUCKET_ENDPOINT",
        Fallback("AWS S3"),
        "S3-compatible endpoint of CONNSTR_BUCKET.",
    ),
    worker(
        "CONNSTR_BUCKET_ACCESS_KEY",
        Fallback("the AWS standard chain"),
        "Access key for CONNSTR_BUCKET.",
    )
    .secret(),
    worker(
        "CONNSTR_BUCKET_ACCESS_SECRET",
        Unset,
        "Secret key for CONNSTR_BUCKET.",
    )
    .secret(),
    worker(
        "SETUP_FINISHED_CALLBACK",
        Unset,
        "Executable run after every (re)creation of a dedicated server with 4 arguments: instance name, \
         private connection string, public one or \"\", tags as JSON.",
    ),
    worker(
        "SETUP_FINISHED_CALLBACK_TIMEOUT_SECS",
        Value("30"),
        "Seconds before the callback is killed.",
    ),
    api(
        "WEBHOOK_ALLOW_LOOPBACK",
        Value("false"),
        "Webhooks may call loopback addresses; the embedded default turns it on unless this is given \
         (link-local and metadata addresses are refused regardless).",
    ),
    both(
        "WEBHOOK_ALLOWED_TARGETS",
        Fallback("any address the fixed rules allow"),
        "Comma list of the only webhook targets allowed: host names, .domain suffixes, IP addresses, CIDRs.",
    ),
];
