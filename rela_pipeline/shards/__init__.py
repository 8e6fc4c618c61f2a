"""The shard format and its readers: what ``embed`` writes and ``train`` reads.

* :mod:`.format`    file names, fields and dtypes of a shard set;
* :mod:`.writer`    writing shards (webdataset's ``ShardWriter``);
* :mod:`.manifest`  the manifest: reading, validating, verifying, summarising;
* :mod:`.location`  local directories and URLs of shard sets;
* :mod:`.reader`    opening a shard set for training;
* :mod:`.samples`   reading and checking the samples of one shard;
* :mod:`.plan`      the order an epoch visits its samples, and the ranks' shares;
* :mod:`.batches`   training batches on the device (:class:`.batches.ShardBatches`).
"""
