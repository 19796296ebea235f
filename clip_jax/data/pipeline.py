"""tf.data pipelines for training and evaluation.

Train, per source: this process's shards in seeded groups read round-robin (`ordering.ShardPlan`;
tar records cross from Python a block at a time, TFRecords are read natively) -> block shuffle
+ exact skip -> weighted mix (one source: nothing) -> parallel decode + stateless random resized
crop, samples without image or caption and undecodable ones dropped -> batch (drop_remainder)
-> batched tokenisation (-> short-text cut, `text_shorten`) -> prefetch. Every batch carries
`position`, the resume point after it (see `ordering` for the layout and `ordering.num_skipped`).

Resuming costs the same at any position: the position is mapped to (shard group, records to
skip in each of its shards) from per-shard record counts (`shard_counts`), and only the shards
in flight are opened.

Eval: one source, every sample exactly once across processes, resize + center crop, the last
batch padded to full size with `mask` marking real samples.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import tensorflow as tf

from clip_jax.data import config as config_lib
from clip_jax.data import exit_guard, ordering, shard_counts, sources, text_shorten, transforms
from clip_jax.data import shards as shards_lib

# Salts that separate the random streams derived from one seed.
_SALT_SHARDS, _SALT_BLOCKS, _SALT_MIX, _SALT_AUGMENT = 1, 2, 3, 4
# Serialized TFRecords parsed per block of this many (training).
_PARSE_BLOCK = 256


class NoUsableData(ValueError):
    """The input pipeline reads records but none becomes a sample, or reads no record at all."""


class InputWatch:
    """What the trainer needs to notice a pipeline that can never deliver a batch.

    A pipeline whose every record is dropped (undecodable images, empty captions) or whose
    shards hold no record would otherwise spin forever without output. The pipeline counts the
    raw records it has taken per source (`counters`, updated inside tf.data once per shuffled
    block) and notes reader failures that tf.data would only log; `check(delivered)` raises
    NoUsableData naming the shards when, since the last delivered batch, far more records were
    taken than can be in flight, or when a failure was noted. Call it while waiting for data.
    Raising also sets `stopped`, which ends the watched streams at their next block: a caught
    NoUsableData leaves no input thread spinning over undecodable records (one core, forever).
    """

    def __init__(self):
        self.counters: list[tf.Variable] = []
        self.stopped = tf.Variable(False, trainable=False)
        self.description = ""
        self.slack = 0
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._mark: tuple[int, int] | None = None  # (samples delivered, records seen) then

    def note_error(self, message: str) -> None:
        with self._lock:
            if not self._errors:
                logging.error("input pipeline: %s", message)
            self._errors.append(message)

    def raise_noted_error(self) -> None:
        """Raises NoUsableData with the first noted reader failure, if any (a shard that could
        not be read: the batches that still come are not the planned ones); cheap, call it
        after every batch."""
        with self._lock:
            if self._errors:
                self.stopped.assign(True)
                raise NoUsableData(self._errors[0])

    def check(self, samples_delivered: int) -> None:
        """Raises NoUsableData if the pipeline cannot deliver; cheap, call it while waiting."""
        self.raise_noted_error()
        if not self.counters:
            return
        seen = sum(int(c.numpy()) for c in self.counters)
        if self._mark is None or self._mark[0] != samples_delivered:
            self._mark = (samples_delivered, seen)  # a batch came since the last check
            return
        if seen - self._mark[1] > self.slack:
            self.stopped.assign(True)
            raise NoUsableData(
                f"no usable sample in {seen - self._mark[1]} records of {self.description}: "
                "every image failed to decode or every caption is empty"
            )


class DamagedJpegLog:
    """Names in the log the samples whose JPEG data looks truncated, each key once.

    libjpeg reports damage ("Premature end of JPEG data. Stopped at line 14/64", "Corrupt JPEG
    data: ...") without saying which sample it was. A JPEG whose last 64 bytes hold no
    end-of-image marker (FF D9) was cut short, as interrupted downloads are: `note` flags such
    records in the graph, vectorised (the train pipeline runs it once per shuffled block), and
    logs their keys from Python only when there are any. The first `named` keys are logged one
    by one, then one line per further 1,000. Damage inside the data that leaves the end intact
    is reported by libjpeg alone.
    """

    def __init__(self, named: int = 20):
        self.named = named
        self.count = 0
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()
        self._guarded_log = exit_guard.guarded(self._log)  # built outside traced code

    def _log(self, keys) -> bool:
        for key in keys.numpy().tolist():
            with self._lock:
                if key in self._seen:
                    continue
                if len(self._seen) < 100_000:
                    self._seen.add(key)
                self.count += 1
                count = self.count
            if count <= self.named:
                logging.warning(
                    "input pipeline: sample %r has truncated JPEG data (no end-of-image marker);"
                    " the libjpeg warning about it says 'Premature end of JPEG data'; "
                    "undecodable samples are skipped and counted",
                    key.decode("utf-8", errors="replace"),
                )
            elif count % 1000 == 0:
                logging.warning("input pipeline: %d samples with truncated JPEG data so far", count)
        return True

    @staticmethod
    def truncated(encoded: tf.Tensor) -> tf.Tensor:
        """bool, `encoded`'s shape: JPEG data without FF D9 in its last 64 bytes."""
        n = tf.strings.length(encoded)
        k = tf.minimum(n, 64)
        # [..., 64]: zero padding after a short tail cannot form FF D9.
        tail = tf.io.decode_raw(tf.strings.substr(encoded, n - k, k), tf.uint8, fixed_length=64)
        has_end = tf.reduce_any(
            tf.logical_and(tf.equal(tail[..., :-1], 0xFF), tf.equal(tail[..., 1:], 0xD9)), -1
        )
        is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8")
        return tf.logical_and(is_jpeg, tf.logical_not(has_end))

    def note(self, encoded: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """An op (bool scalar) that logs the keys of truncated JPEGs among `encoded` (string
        scalar or `[N]`, `keys` alike); run it before they are decoded."""
        flags = tf.reshape(self.truncated(encoded), [-1])
        return tf.cond(
            tf.reduce_any(flags),
            lambda: tf.py_function(
                self._guarded_log,
                [tf.boolean_mask(tf.reshape(keys, [-1]), flags)],
                tf.bool,
            ),
            lambda: tf.constant(True),
        )


def _block_checks(
    watch_counter: tf.Variable | None,
    damaged_jpegs: DamagedJpegLog,
    augment_key: tf.Tensor | None = None,
):
    """`block_shuffle`'s per-block function for training: the per-record work, vectorised.

    Records without an image or caption get an empty image, which the decode map then fails and
    drops (they still count in positions, see `ordering.num_skipped`); truncated JPEGs are
    logged by key; the input watch's record counter advances. Per element these checks cost
    ~60 us of tf.data op overhead (16 px JPEGs: 235 vs 174 us per sample with and without).
    Only what later stages use goes on (the key is dropped). With `augment_key` (a pipeline of
    one source), each record also gets its `position` and `crop_key` here, as `ordering.mix`
    attaches them to a mixture's elements.
    """

    def check(records: dict) -> dict:
        usable = tf.logical_and(
            tf.strings.length(records["image"]) > 0, tf.strings.length(records["text"]) > 0
        )
        deps = [damaged_jpegs.note(records["image"], records["key"])]
        if watch_counter is not None:
            deps.append(watch_counter.assign(records["src_pos"][-1]))
        with tf.control_dependencies(deps):
            image = tf.where(usable, records["image"], "")
        out = {"image": image, "text": records["text"], "src_pos": records["src_pos"]}
        if augment_key is None:
            return out
        return ordering.number_single_source(out, augment_key)

    return check


def _apply_options(ds: tf.data.Dataset, threadpool_size: int = 0) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # Fuses consecutive maps into one stage, e.g. a mixture's attach-position map into the
    # decode map (16 px mixture, same run: 367-378 vs 464-483 us of CPU per sample).
    options.experimental_optimization.map_fusion = True
    if threadpool_size:
        options.threading.private_threadpool_size = threadpool_size
    return ds.with_options(options)


def decode_dropping_errors(ds: tf.data.Dataset, fn, num_parallel_calls: int) -> tf.data.Dataset:
    """`ds.map(fn)` in parallel (order kept); a sample whose `fn` fails (corrupt image) is dropped.

    `ignore_errors` also hides errors from the stages above it, so those must not fail: the
    readers log and record damage themselves (`InputWatch.note_error`, truncated shards read up
    to the damage), and shard lists are checked for existence and readability at start.
    """
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True).ignore_errors(
        log_warning=False
    )


# Factories of Python callbacks are called while tf.data traces a map function; AutoGraph would
# convert the callbacks they return (the nested defs), and converted Python runs slower: the
# batched tokeniser 20.4 vs 16.0 us of CPU per text.
@tf.autograph.experimental.do_not_convert
def _tokenize_fn(tokenizer, context_length: int):
    """`tf.numpy_function` body: `[B]` utf-8 strings -> `int32 [B, context_length]`."""

    def tokenize(texts: np.ndarray) -> np.ndarray:
        strings = [t.decode("utf-8", errors="replace") for t in texts.tolist()]
        tokens = np.asarray(tokenizer(strings, context_length=context_length), dtype=np.int32)
        if tokens.shape != (len(strings), context_length):
            raise ValueError(
                f"tokenizer returned shape {tokens.shape}, expected "
                f"{(len(strings), context_length)}"
            )
        return tokens

    return exit_guard.guarded(tokenize)


def _tokenize_batch(
    texts: tf.Tensor, tokenizer, context_length: int, batch_size: int | None
) -> tf.Tensor:
    tokens = tf.numpy_function(
        _tokenize_fn(tokenizer, context_length), [texts], tf.int32, stateful=False
    )
    tokens.set_shape([batch_size, context_length])
    return tokens


def _peek_jpeg_shapes(
    spec, files: list[str] | None, n: int = 8, tfds_split=None
) -> list[tuple[int, int]]:
    """`(height, width)` of up to `n` JPEGs at the start of the first shard (other formats and
    damaged JPEGs are skipped); [] for sources without shards (folders, TFDS read by TFDS)."""
    if spec.source not in ("tar", "tfrecord", "demo", "tfds") or not files:
        return []
    if spec.source == "tfds":
        images = [] if tfds_split is None else tfds_split.first_images(n)
    elif spec.source == "tfrecord":
        images = []
        try:
            for record in tf.data.TFRecordDataset(files[0]).take(n):
                images.append(sources.parse_tfrecord(record)["image"].numpy())
        except tf.errors.OpError as err:  # a damaged first shard: decide on what was read
            logging.info(
                "data.decode=auto: peeking stopped at damage in %s (%s)",
                files[0],
                type(err).__name__,
            )
    else:
        from clip_jax.data import tar_shards

        images = []
        for _, members in tar_shards.iter_samples(files[0]):
            images.extend(members[e] for e in tar_shards.IMAGE_EXTENSIONS if e in members)
            if len(images) >= n:
                break
    shapes = []
    for image in images[:n]:
        if image[:2] == b"\xff\xd8":
            try:
                h, w, _ = tf.image.extract_jpeg_shape(image).numpy()
            except tf.errors.OpError:
                continue  # a damaged JPEG: the pipeline drops and counts it later
            shapes.append((int(h), int(w)))
    return shapes


def small_images(peeked: list[list[tuple[int, int]]]) -> bool:
    """Whether every source's peeked images (`_peek_jpeg_shapes`, one list per source) are all
    small enough for the one-op resize (`transforms._resize_uint8`'s `small_images`); False
    when a source could not be peeked. A larger image later still gets the same pixels."""
    limit = transforms._ONE_OP_MAX_PIXELS
    return all(shapes and all(h * w <= limit for h, w in shapes) for shapes in peeked)


def use_windowed_decode(
    data_config, spec, files: list[str] | None, image_size: int, peeked=None
) -> bool:
    """`data.decode`: "window"/"full", or for "auto" whether the source's JPEGs are >= 2x the
    target (peeked from the first shard, or `peeked` from `_peek_jpeg_shapes`; demo, folders
    and TFDS read by TFDS decode in full)."""
    mode = str(data_config.get("decode", "auto")) if hasattr(data_config, "get") else "auto"
    if mode != "auto":
        return mode == "window"
    if spec.source not in ("tar", "tfrecord", "tfds") or not files:
        return False
    shapes = _peek_jpeg_shapes(spec, files) if peeked is None else peeked
    sides = [min(h, w) for h, w in shapes]
    window = bool(sides) and float(np.median(sides)) >= 2 * image_size
    logging.info(
        "data.decode=auto: median shorter side %s px of %d peeked JPEGs -> %s decoding",
        np.median(sides) if sides else "n/a",
        len(sides),
        "window" if window else "full",
    )
    return window


def _shard_files(spec: config_lib.SourceSpec) -> list[str]:
    if spec.source == "demo":
        return shards_lib.demo_shards(spec.split)
    return shards_lib.resolve_files(spec.shards, what=f"{spec.source} shards")


def _tfrecord_count_fn(counter: shard_counts.ShardCounter, watch: InputWatch | None):
    """`count(path bytes) -> int64` records of a TFRecord file (what its reader can read; a
    damaged file counts its whole records), for `tf.numpy_function` in a shard reader.

    A file that cannot be read (gone since the start, unreadable) is reported to `watch`,
    which stops the run with that message, and read as empty: raised inside tf.data, the error
    would only be retried by the decode stage's `ignore_errors`, a core busy forever."""

    def count(path: bytes) -> np.int64:
        try:
            return np.int64(counter.count(path.decode()))
        except (OSError, tf.errors.OpError) as err:
            message = f"cannot read TFRecord file {path.decode()}: {err}"
            if watch is not None:
                watch.note_error(message)
            else:
                logging.error("input pipeline: %s (read as empty)", message)
            return np.int64(0)

    # Built outside the traced reader: the guard must wrap the callable tf.data calls.
    return exit_guard.guarded(count)


def _shard_reader(
    spec, counter: shard_counts.ShardCounter, watch: InputWatch | None, parse: bool = True
):
    """`reader(path, start) -> records` for the source's shard format (TFRecords: serialized,
    unparsed, with `parse=False`)."""
    if spec.source == "tfrecord":
        count_records = _tfrecord_count_fn(counter, watch)

        def read_tfrecord(path, start):
            count = tf.numpy_function(count_records, [path], tf.int64, stateful=False)
            return sources.tfrecord_shard_dataset(path, start, count, parse=parse)

        return read_tfrecord
    caption_field = spec.caption_field

    def read_tar(path, start):
        return sources.tar_shard_dataset(
            path,
            caption_field,
            start,
            counter=counter,
            on_error=watch.note_error if watch else None,
        )

    return read_tar


def _tfds_dataset_args(spec) -> dict:
    """What names a TFDS split and the features read, for `sources.tfds_*`."""
    return dict(
        name=spec.tfds_name,
        split=spec.split,
        data_dir=spec.tfds_data_dir,
        image_key=spec.image_key,
        text_key=spec.text_key,
        label_key=spec.label_key,
        label_template=spec.label_template,
    )


def _tfds_records(spec, *, train: bool, seed: int, process_index: int, process_count: int):
    """`sources.tfds_records` for `spec`: shuffled files and endless for training, one ordered
    pass for evaluation."""
    return sources.tfds_records(
        **_tfds_dataset_args(spec),
        shuffle_files=train,
        seed=(seed * 1_000_003 + process_index) % (2**31) if train else 0,
        process_index=process_index,
        process_count=process_count,
        repeat=train,
    )


def _tfds_shards(spec, process_count: int):
    """`sources.tfds_shards` for `spec` where this process can use it (at least one file per
    process), else None after logging why TFDS's own reader is used."""
    shards, why = sources.tfds_shards(**_tfds_dataset_args(spec))
    if shards is not None and len(shards.files) < process_count:
        shards, why = None, f"{len(shards.files)} files for {process_count} processes"
    if shards is None:
        logging.info(
            "TFDS %s: read through TFDS (%s); a resume skips records by reading them",
            spec.tfds_name or spec.tfds_data_dir,
            why,
        )
    return shards


def _train_raw_source(
    spec,
    *,
    seed,
    process_index,
    process_count,
    key,
    start,
    block,
    cycle_length,
    resample,
    num_parallel_calls,
    index_dir,
    watch,
    files,
    tfds_split=None,
):
    """Raw records of one source for this process, from raw record `block_start(start)` on:
    `(dataset, blocked)`, blocked when the dataset yields them in blocks (dicts of `[n]`).
    `files`: the source's shards (TFDS: `tfds_split.files`, when `_tfds_shards` gave one)."""
    if spec.source == "tfds" and tfds_split is None:
        raw = _tfds_records(
            spec, train=True, seed=seed, process_index=process_index, process_count=process_count
        )
        return raw.skip(ordering.block_start(start, block)), False
    if spec.source == "image_folder":
        raise ValueError("source 'image_folder' is for evaluation only (it has no captions)")
    files = shards_lib.split_for_process(files, process_index, process_count)
    fmt = "tfrecord" if spec.source in ("tfrecord", "tfds") else "tar"
    counter = shard_counts.ShardCounter(fmt, index_dir)
    if tfds_split is not None:
        # Exact counts from the dataset's metadata: no file is read to find a resume point.
        known = dict(zip(tfds_split.files, tfds_split.counts))
        if not any(known[f] for f in files):
            raise NoUsableData(f"every TFDS file of this process is empty: {spec.tfds_name}")
        count = known.__getitem__
    else:
        count = counter.count
    plan = ordering.ShardPlan(
        len(files),
        seed=[seed, process_index, key, _SALT_SHARDS],
        cycle_length=cycle_length,
        resample=resample,
    )
    raw_start = ordering.block_start(start, block)
    try:
        group, slots, starts = plan.resume_point(raw_start, lambda i: count(files[i]))
    except ValueError as err:
        raise NoUsableData(f"{err}: {spec.shards or spec.source}") from None
    on_error = watch.note_error if watch else None
    if fmt == "tar":
        blocks = sources.tar_stream(
            files,
            plan,
            start_group=group,
            first_slots=slots,
            first_starts=starts,
            caption_field=spec.caption_field,
            counter=counter,
            on_error=on_error,
        )
        return blocks, True
    # TFRecords cross the interleave serialized and are parsed 256 at a time (one vectorised
    # parse instead of a per-record map stage inside each shard's reader).
    if tfds_split is not None:
        reader = tfds_split.reader(_tfrecord_count_fn(counter, watch))
        parse = tfds_split.parse
    else:
        reader, parse = _shard_reader(spec, counter, watch, parse=False), sources.parse_tfrecord
    records = sources.read_groups(
        files,
        plan,
        reader,
        start_group=group,
        first_slots=slots,
        first_starts=starts,
        num_parallel_calls=num_parallel_calls,
        counter=counter,
        on_error=on_error,
    )
    return records.batch(_PARSE_BLOCK).map(parse), True


def build_train_dataset(
    data_config,
    *,
    image_size: int,
    tokenizer,
    context_length: int,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_position=None,
    watch: InputWatch | None = None,
    index_dir: str = "",
) -> tf.data.Dataset:
    """Endless training batches for this process.

    Yields dicts:
      image: uint8 [local_batch_size, image_size, image_size, 3] (not normalised)
      text: int32 [local_batch_size, L] token ids (0 = pad); L = data.context_length when set
        (shorter captions, cut as data.text_shorten says; see `text_shorten`), else
        `context_length` (the model's)
      position: int64 [num_sources + 1], the resume point after this batch: per source the
        raw records consumed, then the mixed records consumed (incl. skipped bad samples).
    Rebuilding with `start_position=<a batch's position>` continues with exactly the batch the
    uninterrupted pipeline would have produced next (same samples, augmentation, order), in
    the same time whatever the position. `watch` (optional) is filled so that a consumer can
    tell a pipeline that will never deliver (see `InputWatch`). `index_dir` (optional) caches
    per-shard record counts across runs (`shard_counts`); the trainer uses `<workdir>/data_index`.
    """
    config_lib.validate(data_config)
    specs = config_lib.source_specs(data_config)
    start = ordering.normalize_start(start_position, len(specs))
    length, shorten = _text_length(data_config, context_length)
    if shorten is not None:  # random cuts need the whole caption: tokenise at full length
        full = build_train_dataset(
            _with_full_text(data_config),
            image_size=image_size,
            tokenizer=tokenizer,
            context_length=context_length,
            local_batch_size=local_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_position=start_position,
            watch=watch,
            index_dir=index_dir,
        )
        return text_shorten.shorten_dataset(
            full,
            length=length,
            mode=shorten,
            seed=seed,
            process_index=process_index,
            has_sot=getattr(tokenizer, "sot_id", None) is not None,
        )
    context_length = length
    if specs[0].source == "synthetic":
        from clip_jax.data import synthetic

        return synthetic.synthetic_train_dataset(
            pool_size=int(data_config.synthetic_pool_size),
            image_size=image_size,
            context_length=context_length,
            vocab_size=tokenizer.vocab_size,
            local_batch_size=local_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_position=int(start[-1]) if start else 0,
        )
    npc = int(data_config.num_parallel_calls)
    block = int(data_config.shuffle_buffer)
    if watch is not None:
        watch.counters = [
            tf.Variable(start[j] if start else 0, dtype=tf.int64, trainable=False)
            for j in range(len(specs))
        ]
        watch.description = "; ".join(str(s.shards or f"{s.source}:{s.split}") for s in specs)
        # Records between the counters (taken when a block is shuffled) and the consumer: up
        # to a block per source ahead, the decode stage's buffers, the batch being filled and
        # the batches prefetched by tf.data and onto the devices.
        watch.slack = 2 * max(block, 1) * len(specs) + 8 * local_batch_size + 4096
    tfds_splits = [
        _tfds_shards(spec, process_count) if spec.source == "tfds" else None for spec in specs
    ]
    shard_lists = [
        list(t.files)
        if t is not None
        else (_shard_files(spec) if spec.source in ("tar", "tfrecord", "demo") else None)
        for spec, t in zip(specs, tfds_splits)
    ]
    damaged_jpegs = DamagedJpegLog()
    aug_key = ordering.seed_key(seed, process_index, _SALT_AUGMENT)
    streams = []
    for j, spec in enumerate(specs):
        key = ordering.seed_key(seed, process_index, j)
        source_start = start[j] if start else 0
        raw, blocked = _train_raw_source(
            spec,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            key=j,
            start=source_start,
            block=block,
            cycle_length=int(data_config.shard_cycle_length),
            resample=bool(data_config.resample),
            num_parallel_calls=npc,
            index_dir=index_dir,
            watch=watch,
            files=shard_lists[j],
            tfds_split=tfds_splits[j],
        )
        on_block = _block_checks(
            watch.counters[j] if watch is not None else None,
            damaged_jpegs,
            augment_key=aug_key if len(specs) == 1 else None,
        )
        streams.append(
            ordering.block_shuffle(
                raw,
                block=block,
                key=ordering.fold_in(key, _SALT_BLOCKS),
                start=source_start,
                on_block=on_block,
                stop=watch.stopped if watch is not None else None,
                blocked=blocked,
            )
        )
    mixed = ordering.mix(
        streams,
        [s.weight for s in specs],
        key=ordering.seed_key(seed, process_index, _SALT_MIX),
        start=start,
        augment_key=aug_key,
    )
    scale, ratio = tuple(data_config.aug_scale), tuple(data_config.aug_ratio)
    flip = float(data_config.get("aug_flip", 0.0))
    sentence_dropout = float(data_config.get("sentence_dropout", 0.0))
    method = data_config.resize_method

    peeked = [
        _peek_jpeg_shapes(spec, files, tfds_split=t)
        for spec, files, t in zip(specs, shard_lists, tfds_splits)
    ]
    if len(specs) == 1:
        window = use_windowed_decode(
            data_config, specs[0], shard_lists[0], image_size, peeked=peeked[0]
        )
    else:  # "auto" keeps full decoding for mixtures
        window = str(data_config.get("decode", "auto")) == "window"
    small = small_images(peeked)

    def transform(rec):
        # Records without an image or caption arrive with an empty image (`_block_checks`) and
        # are dropped here with undecodable images, by failing the map (no filter stage, no
        # per-element check); they still count in `position`.
        crop_key = rec["crop_key"]
        if window:  # same crop windows as the two-step path, decoding only them
            image = transforms.decode_random_resized_crop(
                rec["image"], crop_key, image_size, scale=scale, ratio=ratio, method=method
            )
        else:
            image = transforms.random_resized_crop(
                transforms.decode_image(rec["image"]),
                crop_key,
                image_size,
                scale=scale,
                ratio=ratio,
                method=method,
                small_images=small,
            )
        if flip > 0:
            image = transforms.random_flip(image, crop_key, flip)
        return {"image": image, "text": rec["text"], "position": rec["position"]}

    ds = decode_dropping_errors(mixed, transform, npc)
    ds = ds.batch(local_batch_size, drop_remainder=True)

    def finish(batch):
        texts, position = batch["text"], batch["position"][-1]
        if sentence_dropout > 0:
            texts = text_shorten.drop_sentences_in_batch(
                texts,
                position,
                probability=sentence_dropout,
                seed=seed,
                process_index=process_index,
            )
        return {
            "image": batch["image"],
            "text": _tokenize_batch(texts, tokenizer, context_length, local_batch_size),
            "position": position,
        }

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(int(data_config.prefetch))
    return _apply_options(ds, int(data_config.threadpool_size))


def _text_length(data_config, context_length: int) -> tuple[int, str | None]:
    """(training text length, the text_shorten mode when captions must be tokenised at the
    model's `context_length` first and then cut, else None)."""
    length = int(data_config.get("context_length", 0) or 0)
    mode = str(data_config.get("text_shorten", "truncate"))
    if not length or length == context_length:
        return context_length, None
    if length > context_length:
        raise ValueError(
            f"data.context_length={length} is longer than the model's text context {context_length}"
        )
    # Tokenising at `length` truncates exactly as text_shorten.shorten(mode="truncate") does,
    # for real sources; synthetic rows are cut like captions.
    if mode == "truncate" and config_lib.source_specs(data_config)[0].source != "synthetic":
        return length, None
    return length, mode


def _with_full_text(data_config):
    """The data config with data.context_length unset (the model's context)."""
    if isinstance(data_config, dict):
        return dict(data_config, context_length=0)
    full = data_config.copy_and_resolve_references()
    with full.unlocked():
        full.context_length = 0
    return full


def _pad_batch(batch: dict, batch_size: int) -> dict:
    """Pads every field of a possibly short batch to `batch_size`; adds `mask` bool [B]."""
    n = tf.shape(batch["image"])[0]
    out = {}
    for name, value in batch.items():
        rank = len(value.shape)
        paddings = [[0, batch_size - n]] + [[0, 0]] * (rank - 1)
        constant = "" if value.dtype == tf.string else 0
        padded = tf.pad(value, paddings, constant_values=constant)
        padded.set_shape([batch_size] + value.shape[1:].as_list())
        out[name] = padded
    out["mask"] = tf.range(batch_size) < n
    return out


def _eval_raw_source(spec, *, process_index, process_count, cycle_length, num_parallel_calls):
    if spec.source == "tfds":
        return _tfds_records(
            spec, train=False, seed=0, process_index=process_index, process_count=process_count
        )
    if spec.source == "image_folder":
        raw, _ = sources.image_folder_records(spec.image_folder)
        return raw.shard(process_count, process_index)
    files = _shard_files(spec)
    counter = shard_counts.ShardCounter("tfrecord" if spec.source == "tfrecord" else "tar")
    raw = sources.read_in_order(
        files, _shard_reader(spec, counter, None), cycle_length, num_parallel_calls
    )
    # Record-level split: exactly once across processes whatever the shard count (eval sets
    # are small enough for every process to read all shards).
    return raw.shard(process_count, process_index)


def build_eval_dataset(
    spec_or_config,
    *,
    image_size: int,
    tokenizer,
    context_length: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    resize_method: str | None = None,
    num_parallel_calls: int = -1,
    decode: str = "auto",
) -> tf.data.Dataset:
    """Every sample of one source exactly once (across processes), in a fixed order.

    `spec_or_config` is a data config (single source), a per-source dict, or a `SourceSpec`.
    A sample is kept when its image decodes and it has a caption or a label. Yields dicts with
    every batch padded to `batch_size` (static shapes for jit):
      image: uint8 [B, image_size, image_size, 3]   (zeros in padding rows)
      text: int32 [B, context_length]   (omitted for image folders, which have no captions)
      label: int32 [B]                  (-1 where a sample has no label)
      caption: string [B]               (raw caption, b"" if none; several captions of one image
                                         share its `key`)
      key: string [B]                   (sample key / relative path)
      mask: bool [B]                    (True for real samples, False for padding)
    `num_batches`: if given, the stream is padded with all-False-mask batches to exactly that
    many batches (equal step counts on every process) and raises if there is more data.
    Resize: `resize_method` (default the config's, else bicubic), shorter side to image_size,
    then center crop; `decode` as `data.decode` ("auto": decode only the used window when the
    source's JPEGs are >= 2x image_size).
    """
    if isinstance(spec_or_config, config_lib.SourceSpec):
        spec = spec_or_config
    else:
        spec = config_lib.as_source_spec(spec_or_config)
        if resize_method is None and not isinstance(spec_or_config, dict):
            resize_method = getattr(spec_or_config, "resize_method", None)
    config_lib.validate_source(spec)
    if decode not in config_lib.DECODE_MODES:
        raise ValueError(f"decode={decode!r}; choose one of {config_lib.DECODE_MODES}")
    method = resize_method or "bicubic"
    if method not in transforms.RESIZE_METHODS:
        raise ValueError(f"resize_method={method!r}; choose one of {transforms.RESIZE_METHODS}")
    raw = _eval_raw_source(
        spec,
        process_index=process_index,
        process_count=process_count,
        cycle_length=16,
        num_parallel_calls=num_parallel_calls,
    )
    raw = raw.filter(
        lambda r: tf.logical_and(
            tf.strings.length(r["image"]) > 0,
            tf.logical_or(tf.strings.length(r["text"]) > 0, r["label"] >= 0),
        )
    )
    with_text = spec.source != "image_folder" and tokenizer is not None
    window = use_windowed_decode(
        {"decode": decode},
        spec,
        _shard_files(spec) if spec.source in ("tar", "tfrecord") else None,
        image_size,
    )

    damaged_jpegs = DamagedJpegLog()

    def transform(rec):
        with tf.control_dependencies([damaged_jpegs.note(rec["image"], rec["key"])]):
            if window:
                image = transforms.decode_resize_center_crop(
                    rec["image"], image_size, method=method
                )
            else:
                image = transforms.resize_center_crop(
                    transforms.decode_image(rec["image"]), image_size, method=method
                )
        return {
            "image": image,
            "label": tf.cast(rec["label"], tf.int32),
            "caption": rec["text"],
            "key": rec["key"],
        }

    ds = decode_dropping_errors(raw, transform, num_parallel_calls).batch(batch_size)

    def finish(batch):
        batch = _pad_batch(batch, batch_size)
        if with_text:
            batch["text"] = _tokenize_batch(batch["caption"], tokenizer, context_length, batch_size)
        return batch

    ds = ds.map(finish, num_parallel_calls=1, deterministic=True)
    if num_batches is not None:

        def check(i, batch):
            with tf.control_dependencies(
                [
                    tf.debugging.assert_less(
                        i,
                        tf.constant(num_batches, tf.int64),
                        message=f"eval data has more than num_batches={num_batches} batches",
                    )
                ]
            ):
                return {k: tf.identity(v) for k, v in batch.items()}

        # All-padding batch built from the element spec (works even if this process has no data).
        empty = {
            k: tf.fill(s.shape, "") if s.dtype == tf.string else tf.zeros(s.shape, s.dtype)
            for k, s in ds.element_spec.items()
        }
        padding = tf.data.Dataset.from_tensors(empty).repeat(num_batches)
        # filter (not take) so that the stream is read to its end and the check sees any excess.
        ds = (
            ds.enumerate()
            .map(check)
            .concatenate(padding)
            .enumerate()
            .filter(lambda i, b: i < num_batches)
            .map(lambda i, b: b)
        )
    return _apply_options(ds.prefetch(2))


def image_folder_classnames(root: str) -> list[str]:
    """Sorted class names (= labels 0..N-1) of an image-folder eval set."""
    return sources.list_image_folder(root)[2]
