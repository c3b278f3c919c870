// graphile-worker settings for berth's queue anchor: the values of graphile-worker's own perfTest
// (perfTest/graphile.config.js and perfTest/run.js in github.com/graphile/worker): 24 concurrent jobs per
// process, a pool of 25, a local queue of 500 with a 10 ms refetch delay, unbatched completions.
const JOBS = 24;

module.exports = {
  worker: {
    connectionString: process.env.DATABASE_URL,
    fileExtensions: [".js"],
    gracefulShutdownAbortTimeout: 2500,
    concurrentJobs: JOBS,
    maxPoolSize: JOBS + 1,
    localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};
