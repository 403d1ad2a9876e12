// Written by scripts/write_statuses_js.py from dvemb/formats/statuses.py: do not edit (scripts/check.sh
// fails when it is out of date). The statuses the API's answers carry, as the server names them.

export const FileStatus = Object.freeze({
  UPLOADING: "uploading",
  RECEIVED: "received",
  VALIDATING: "validating",
  READY: "ready",
  REJECTED: "rejected",
});

export const JobStatus = Object.freeze({
  QUEUED: "queued",
  RUNNING: "running",
  SUCCEEDED: "succeeded",
  FAILED: "failed",
  CANCELLED: "cancelled",
});

export const QueryStatus = Object.freeze({
  QUEUED: "queued",
  SUCCEEDED: "succeeded",
  FAILED: "failed",
});

export const ReplayStatus = Object.freeze({
  QUEUED: "queued",
  RUNNING: "running",
  SUCCEEDED: "succeeded",
  FAILED: "failed",
});

export const RunStatus = Object.freeze({
  CREATED: "created",
  UPLOADING: "uploading",
  READY: "ready",
  FAILED: "failed",
});

export const SegmentStatus = Object.freeze({
  WAITING: "waiting",
  RUNNING: "running",
  DONE: "done",
});
