"""One rank's engine: sequences, scheduler, paged block manager, model runner, sampler, step loop."""
