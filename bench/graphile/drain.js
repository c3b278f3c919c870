#!/usr/bin/env node
// Times graphile-worker draining no-op jobs the way its perfTest does: one add_jobs batch, then PARALLELISM
// CLI processes (`-j 24 -m 25`, settings in graphile.config.js).
//   node drain.js once N     add N jobs, run the processes with --once until the queue is empty; the rate is
//                            N / (drain time - an empty --once start/stop), as the perfTest computes it.
//   node drain.js sample B N add B jobs, run the processes until the first N (by id) are done, then stop them;
//                            the rate is N / (that time - the same empty start/stop), with B - N jobs still queued.
// Prints one JSON line on stdout. DATABASE_URL names a database of its own.
const { spawn, execFileSync } = require("child_process");
const { Client } = require("pg");

const PARALLELISM = 4;
const JOBS = 24;
const cli = require("path").join(__dirname, "node_modules/graphile-worker/dist/cli.js");
const env = { ...process.env, NO_LOG_SUCCESS: "1" };
process.chdir(__dirname);

const now = () => Number(process.hrtime.bigint()) / 1e6;
const runCli = (args) => execFileSync(process.execPath, [cli, ...args], { env, stdio: ["ignore", "ignore", "inherit"] });
const startWorker = (args) => {
  const child = spawn(process.execPath, [cli, "-j", String(JOBS), "-m", String(JOBS + 1), ...args], {
    env,
    stdio: ["ignore", "ignore", "inherit"],
  });
  const exited = new Promise((resolve, reject) => {
    child.on("exit", (code, signal) => (code === 0 || signal ? resolve() : reject(new Error(`worker exited ${code}`))));
  });
  return { child, exited };
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function addJobs(db, n) {
  const t = now();
  await db.query(
    `SELECT graphile_worker.add_jobs(ARRAY(
       SELECT json_populate_record(NULL::graphile_worker.job_spec,
                json_build_object('identifier', 'log_if_999', 'payload', json_build_object('id', i)))
       FROM generate_series(1, $1::int) i))`,
    [n],
  );
  const ms = now() - t;
  // Settle as berth-bench does for berth: vacuumed, analyzed, dirty pages flushed before the timed part.
  await db.query("VACUUM (ANALYZE) graphile_worker._private_jobs");
  await db.query("CHECKPOINT");
  return ms;
}

async function main() {
  const [mode, a, b] = process.argv.slice(2);
  runCli(["--schema-only"]);
  const db = new Client({ connectionString: process.env.DATABASE_URL });
  await db.connect();
  await db.query("DELETE FROM graphile_worker._private_jobs");
  try {
    if (mode === "once") {
      const n = Number(a);
      let t = now();
      runCli(["--once", "-j", String(JOBS), "-m", String(JOBS + 1)]);
      const startup = now() - t;
      const addMs = await addJobs(db, n);
      t = now();
      await Promise.all(Array.from({ length: PARALLELISM }, () => startWorker(["--once"]).exited));
      const drain = now() - t;
      const left = (await db.query("SELECT count(*)::int AS c FROM graphile_worker._private_jobs")).rows[0].c;
      if (left !== 0) throw new Error(`${left} jobs left after the drain`);
      const rate = (1000 * n) / (drain - startup);
      console.log(JSON.stringify({ mode, jobs: n, add_ms: addMs, startup_ms: startup, drain_ms: drain, jobs_per_s: rate }));
    } else if (mode === "sample") {
      const backlog = Number(a);
      const n = Number(b);
      const t1 = now();
      runCli(["--once", "-j", String(JOBS), "-m", String(JOBS + 1)]);
      const startup = now() - t1;
      const addMs = await addJobs(db, backlog);
      const first = Number((await db.query("SELECT min(id) AS m FROM graphile_worker._private_jobs")).rows[0].m);
      const limit = first + n;
      const t = now();
      const workers = Array.from({ length: PARALLELISM }, () => startWorker([]));
      const deadline = t + 30 * 60 * 1000;
      let done = false;
      // As berth-bench polls berth: the sample's last job by primary key (cheap), and only once it is gone
      // the query over the whole sample, which walks the dead index entries deletes leave behind.
      let lastGone = false;
      while (!done && now() < deadline) {
        await sleep(10);
        if (!lastGone) {
          const r = await db.query("SELECT NOT EXISTS (SELECT 1 FROM graphile_worker._private_jobs WHERE id = $1) AS g", [limit - 1]);
          lastGone = r.rows[0].g;
        }
        if (lastGone) {
          const r = await db.query("SELECT NOT EXISTS (SELECT 1 FROM graphile_worker._private_jobs WHERE id < $1) AS d", [limit]);
          done = r.rows[0].d;
        }
      }
      const ms = now() - t;
      for (const w of workers) w.child.kill("SIGTERM");
      await Promise.all(workers.map((w) => w.exited));
      if (!done) throw new Error("timed out");
      const left = (await db.query("SELECT count(*)::int AS c FROM graphile_worker._private_jobs")).rows[0].c;
      const rate = (1000 * n) / (ms - startup);
      console.log(JSON.stringify({ mode, backlog, jobs: n, add_ms: addMs, startup_ms: startup, drain_ms: ms, jobs_per_s: rate, left }));
    } else {
      throw new Error("usage: drain.js once N | sample BACKLOG N");
    }
  } finally {
    await db.end();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
