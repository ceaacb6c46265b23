"""One render attempt, without Ray: candidates, the quality gate, post-processing
orchestration, the manifest and the artifacts, and preemption with a checkpoint
(`attempt.AttemptRunner`). Its engine, chunk runner, artifact store, preemption signal
and drill holds are given to it; nothing here imports Ray, `farm.serve`, `farm.api`
or `farm.jobs`."""
