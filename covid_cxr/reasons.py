"""The catalogue of every code covid-cxr stores in ``instances.reason`` or prints as an error code."""

from __future__ import annotations

from enum import StrEnum


class ReasonKind(StrEnum):
    """Where a code comes from, and so where an operator meets it."""

    #: ingest refused the file: state ``rejected``, the file is quarantined.
    REJECTION = "rejection"
    #: ingest recorded a second copy or a conflicting version of an instance.
    OUTCOME = "outcome"
    #: the worker gave up on an instance: state ``failed`` (or stored while it is retried).
    FAILURE = "failure"
    #: a :class:`~covid_cxr.errors.CovidCxrError` a command prints; the worker stores model errors as failures.
    ERROR = "error"
    #: bad command-line input; the command exits with code 2.
    USAGE = "usage"
    #: one line of a ground-truth labels file that ``labels import`` skips or warns about.
    LABEL_PROBLEM = "label_problem"
    #: an inbox entry the ingester cannot take yet: listed as stuck (``status``) and retried with back-off.
    STUCK = "stuck"
    #: a result document that could not be made or sent to a destination (``deliveries.reason``).
    DELIVERY = "delivery"


class Reason(StrEnum):
    """A stable reason code with its kind and its one-line description for operators.

    The value is what is stored, counted and matched on; it never changes once released.
    :attr:`description` (one sentence, no trailing period) is what the docs table and
    ``covid-cxr status`` show beside the code.
    """

    kind: ReasonKind
    description: str

    def __new__(cls, code: str, kind: ReasonKind, description: str) -> Reason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.kind = kind
        member.description = description
        return member

    @classmethod
    def lookup(cls, code: str | None) -> Reason | None:
        """The member for a stored code; ``None`` for no code or one this release does not know (older rows)."""
        return next((reason for reason in cls if reason.value == code), None)

    # --- rejections (ingest) ---------------------------------------------------------------------
    NOT_DICOM = (
        "not_dicom", ReasonKind.REJECTION,
        "Empty, not DICOM at all (no DICM prefix and no plausible DICOM elements), or a header that cannot be "
        "parsed as DICOM",
    )
    TRUNCATED = (
        "truncated", ReasonKind.REJECTION,
        "A DICOM file that ends too early: an element, the pixel data or its delimiter is cut off, or a JPEG / "
        "JPEG 2000 codestream lacks its end marker",
    )
    NO_PIXEL_DATA = (
        "no_pixel_data", ReasonKind.REJECTION,
        "An image object without Pixel Data (e.g. pixel data stripped by an export)",
    )
    NOT_AN_IMAGE = (
        "not_an_image", ReasonKind.REJECTION,
        "A non-image DICOM object (structured report, presentation state, key object selection, DICOMDIR, "
        "waveform, RT plan or dose, segmentation, encapsulated document)",
    )
    UNSUPPORTED_TRANSFER_SYNTAX = (
        "unsupported_transfer_syntax", ReasonKind.REJECTION,
        "Pixel data compressed with a transfer syntax no installed decoder handles (the message names the missing "
        "decoder)",
    )
    DECODE_FAILED = (
        "decode_failed", ReasonKind.REJECTION,
        "The decoder or the modality LUT failed on this file's pixel data (corrupt or inconsistent Image Pixel "
        "module)",
    )
    UNSUPPORTED_PHOTOMETRIC = (
        "unsupported_photometric", ReasonKind.REJECTION,
        "Not a grayscale image: RGB, YBR or PALETTE COLOR (or more than one sample per pixel)",
    )
    WRONG_MODALITY = (
        "wrong_modality", ReasonKind.REJECTION,
        "Modality is not one of the accepted radiograph modalities (default CR, DX)",
    )
    WRONG_BODY_PART = (
        "wrong_body_part", ReasonKind.REJECTION,
        "BodyPartExamined names another region than the chest; when it is absent, the Anatomic Region Sequence, "
        "study/series description or protocol name does",
    )
    LATERAL_VIEW = (
        "lateral_view", ReasonKind.REJECTION,
        "ViewPosition says lateral (LL, RL, LATERAL), or it is empty and a description or the protocol name does; "
        "the model only knows frontal views",
    )
    NOT_HUMAN = (
        "not_human", ReasonKind.REJECTION,
        "The header describes an animal: a species, breed or owner element, or a species or veterinary word in a "
        "description or the institution",
    )
    INVERTED_IMAGE = (
        "inverted_image", ReasonKind.REJECTION,
        "The quality check found the image a negative (bones dark) and the polarity policy is 'reject'",
    )
    WRONG_ORIENTATION = (
        "wrong_orientation", ReasonKind.REJECTION,
        "The quality check found the image upside down or turned by 90 degrees and the orientation policy is "
        "'reject'",
    )
    NOT_FRONTAL_CHEST = (
        "not_frontal_chest", ReasonKind.REJECTION,
        "The quality check is confident the image is not a frontal chest radiograph (another region, a lateral, "
        "not a radiograph)",
    )
    MULTI_FRAME = (
        "multi_frame", ReasonKind.REJECTION,
        "More than one frame, and the multi-frame policy is 'reject'",
    )
    TOO_LARGE = (
        "too_large", ReasonKind.REJECTION,
        "The file is larger than the configured file-size limit, Rows x Columns x NumberOfFrames exceeds the "
        "configured pixel limit, or decoding needed more memory than a decode process may use (decompression-bomb "
        "guards)",
    )
    CODESTREAM_MISMATCH = (
        "codestream_mismatch", ReasonKind.REJECTION,
        "The compressed pixel data declares other dimensions or more components than the header's Rows, Columns "
        "and SamplesPerPixel (checked before decoding: a decompression bomb or a damaged file)",
    )
    DECODE_TIMEOUT = (
        "decode_timeout", ReasonKind.REJECTION,
        "Reading the file took longer than the configured per-file time limit; its decode process was stopped and "
        "replaced",
    )
    INTERNAL_ERROR = (
        "internal_error", ReasonKind.REJECTION,
        "An unexpected error inside covid-cxr (a bug, not a property of the file)",
    )

    # --- outcomes (ingest) -----------------------------------------------------------------------
    DUPLICATE_INSTANCE = (
        "duplicate_instance", ReasonKind.OUTCOME,
        "A byte-identical copy (same SOPInstanceUID and sha256) of an instance already received; not predicted "
        "again",
    )
    SOP_INSTANCE_CONFLICT = (
        "sop_instance_conflict", ReasonKind.OUTCOME,
        "The SOPInstanceUID was already received with different content; this version waits in quarantine for an "
        "operator to decide",
    )

    # --- failures (worker) -----------------------------------------------------------------------
    CORRUPT_IMAGE = (
        "corrupt_image", ReasonKind.FAILURE,
        "The stored normalized image cannot be decoded as a PNG",
    )
    MISSING_IMAGE = (
        "missing_image", ReasonKind.FAILURE,
        "No normalized image was stored for the instance, so there is nothing to predict",
    )
    PREPROCESSING_MISMATCH = (
        "preprocessing_mismatch", ReasonKind.FAILURE,
        "The image was normalized with another preprocessing version than the model expects; ingest the file again",
    )
    INFERENCE_ERROR = (
        "inference_error", ReasonKind.FAILURE,
        "An unexpected error while predicting the batch (the message names it); retried until the attempts are "
        "used up",
    )
    NON_FINITE_SCORES = (
        "non_finite_scores", ReasonKind.FAILURE,
        "The model gave NaN or infinite probabilities for the batch (seen with a mixed precision on some backends); "
        "nothing is stored, the batch is retried until the attempts are used up",
    )
    WORKER_LOST = (
        "worker_lost", ReasonKind.FAILURE,
        "The attempts were used up by workers that never finished (killed, or out of memory)",
    )

    # --- errors (the exception classes' defaults, then the specific codes) -----------------------
    ERROR = (
        "error", ReasonKind.ERROR,
        "An error covid-cxr reports on purpose, without a more specific code",
    )
    BAD_CONFIGURATION = (
        "bad_configuration", ReasonKind.ERROR,
        "Settings are missing or invalid (a COVID_CXR_* variable, a flag, or the data dir's layout)",
    )
    REJECTED = (
        "rejected", ReasonKind.ERROR,
        "An input file cannot be used, without a more specific rejection code",
    )
    BAD_DATASET = (
        "bad_dataset", ReasonKind.ERROR,
        "A training or evaluation dataset is unusable, without a more specific code",
    )
    MODEL_ERROR = (
        "model_error", ReasonKind.ERROR,
        "A model cannot be built, found, verified or loaded (e.g. its classes are not the two covid-cxr needs)",
    )
    MODEL_INTEGRITY = (
        "model_integrity", ReasonKind.ERROR,
        "A model artifact does not match its record, or it cannot be loaded in Keras safe mode",
    )
    NO_ACTIVE_MODEL = (
        "no_active_model", ReasonKind.ERROR,
        "No model is active, so nothing can be predicted; import or train one and activate it",
    )
    DATABASE_ERROR = (
        "database_error", ReasonKind.ERROR,
        "The database is unreachable or its schema is unusable",
    )
    UNSUPPORTED_DIALECT = (
        "unsupported_dialect", ReasonKind.ERROR,
        "The database URL names another database than SQLite or PostgreSQL",
    )
    SCHEMA_OUT_OF_DATE = (
        "schema_out_of_date", ReasonKind.ERROR,
        "The database schema is not at the code's revision; run `covid-cxr db upgrade`",
    )
    BAD_LABELS_FILE = (
        "bad_labels_file", ReasonKind.ERROR,
        "A ground-truth labels file cannot be read at all (unreadable, bad encoding, wrong or missing header)",
    )
    PNG_NOT_WRITTEN = (
        "png_not_written", ReasonKind.ERROR,
        "`covid-cxr inspect --png` could not encode or write the PNG",
    )
    DATASET_NOT_FOUND = (
        "dataset_not_found", ReasonKind.ERROR,
        "The dataset folder or CSV file does not exist",
    )
    BAD_CSV = (
        "bad_csv", ReasonKind.ERROR,
        "The dataset CSV lacks a column it needs (the path, the label or a --where column)",
    )
    UNKNOWN_LABELS = (
        "unknown_labels", ReasonKind.ERROR,
        "Dataset rows carry labels other than the model's classes; drop them with --where",
    )
    MISSING_FILES = (
        "missing_files", ReasonKind.ERROR,
        "Dataset rows name image files that do not exist",
    )
    EMPTY_DATASET = (
        "empty_dataset", ReasonKind.ERROR,
        "No labelled images were found in the dataset",
    )
    ONE_CLASS_ONLY = (
        "one_class_only", ReasonKind.ERROR,
        "The dataset has images of one class only; a two-class model needs both",
    )
    UNREADABLE_IMAGES = (
        "unreadable_images", ReasonKind.ERROR,
        "Some dataset images cannot be read or are rejected by the reader (the message lists them)",
    )
    BAD_SPLIT = (
        "bad_split", ReasonKind.ERROR,
        "The train/validation/test split cannot be made (too few patients, bad fractions) or is not the one the "
        "model records",
    )
    SHA256_MISMATCH = (
        "sha256_mismatch", ReasonKind.ERROR,
        "A model file's sha256 differs from its record: it changed or was corrupted after it was registered",
    )
    VERSION_CONFLICT = (
        "version_conflict", ReasonKind.ERROR,
        "The model version is already registered with different bytes",
    )
    MODEL_NOT_FOUND = (
        "model_not_found", ReasonKind.ERROR,
        "No model of that name and version is registered",
    )
    BAD_THRESHOLD = (
        "bad_threshold", ReasonKind.ERROR,
        "A decision threshold outside (0, 1) was given",
    )
    NO_STORED_IMAGE = (
        "no_stored_image", ReasonKind.ERROR,
        "The instance has no stored normalized image to explain (unknown id, rejected, or not yet ingested)",
    )
    NOT_SCORED = (
        "not_scored", ReasonKind.ERROR,
        "The instance has no prediction, so no model version to explain it with (not yet scored, or it failed)",
    )
    EXPLAIN_DISABLED = (
        "explain_disabled", ReasonKind.ERROR,
        "Grad-CAM heatmaps are switched off on this dashboard (COVID_CXR_WEB_EXPLAIN=false)",
    )
    EXPLAIN_BUSY = (
        "explain_busy", ReasonKind.ERROR,
        "The dashboard is already making as many heatmaps as it queues (one at a time); ask again shortly",
    )
    DEGENERATE_MODEL = (
        "degenerate_model", ReasonKind.ERROR,
        "Training flagged the model as degenerate (one class for a whole part, or balanced accuracy at chance); "
        "it is activated only with --force",
    )
    ARTIFACT_MISSING = (
        "artifact_missing", ReasonKind.ERROR,
        "A model's file, or its artifact bytes in the database, are missing",
    )
    ARTIFACT_EXISTS = (
        "artifact_exists", ReasonKind.ERROR,
        "The output folder already holds a model artifact; choose another folder",
    )
    INVALID_MODEL_NAME = (
        "invalid_model_name", ReasonKind.ERROR,
        "A model name or version is not made of letters, digits, '.', '_' and '-' alone (or contains '..'); "
        "they name folders, so nothing else is accepted",
    )
    ARTIFACT_INCOMPLETE = (
        "artifact_incomplete", ReasonKind.ERROR,
        "A model artifact's metadata.json is missing, not valid JSON, or lacks a required field",
    )
    UNSAFE_OR_INVALID = (
        "unsafe_or_invalid", ReasonKind.ERROR,
        "The model file cannot be loaded in Keras safe mode (corrupt, or it would run code)",
    )
    WRONG_IO = (
        "wrong_io", ReasonKind.ERROR,
        "The model's input or output shape is not the one covid-cxr feeds and reads",
    )
    IMAGENET_WEIGHTS_UNAVAILABLE = (
        "imagenet_weights_unavailable", ReasonKind.ERROR,
        "Keras's ImageNet VGG16 weights cannot be downloaded (no internet?); pass --base-weights PATH or none",
    )
    WEIGHTS_FILE_MISSING = (
        "weights_file_missing", ReasonKind.ERROR,
        "The --base-weights file does not exist",
    )
    WEIGHTS_FILE_INVALID = (
        "weights_file_invalid", ReasonKind.ERROR,
        "The --base-weights file is not a Keras VGG16 (no top) HDF5 weights file",
    )
    UNKNOWN_WINDOW = (
        "unknown_window", ReasonKind.ERROR,
        "The evaluation window is not one of the known ones (24h, 7d, 30d, all)",
    )
    NO_PREDICTIONS = (
        "no_predictions", ReasonKind.ERROR,
        "The model version has no predictions in the evaluation window",
    )

    # --- usage (bad command-line input, exit code 2) ---------------------------------------------
    USAGE = (
        "usage", ReasonKind.USAGE,
        "Bad command-line input (a file that does not exist, an option out of range), without a more specific code",
    )
    BAD_FILTER = (
        "bad_filter", ReasonKind.USAGE,
        "A --where filter is not COLUMN=VALUE[,VALUE...], or is given with --folder",
    )
    BAD_MODEL_REFERENCE = (
        "bad_model_reference", ReasonKind.USAGE,
        "The model is not given as NAME:VERSION where a version is needed",
    )
    BAD_TRAINING_OPTIONS = (
        "bad_training_options", ReasonKind.USAGE,
        "Training options out of range (epochs, batch size, learning rate, class weight, threshold...)",
    )
    BAD_TRAINABLE_FROM = (
        "bad_trainable_from", ReasonKind.USAGE,
        "--trainable-from names no VGG16 block (block1 to block5, none, or auto)",
    )

    # --- labels-file problems (`covid-cxr labels import`) ----------------------------------------
    UNDECODABLE = (
        "undecodable", ReasonKind.LABEL_PROBLEM,
        "The line is not text (neither UTF-8 nor Windows-1252/Latin-1, or control bytes); skipped",
    )
    NOT_UTF8 = (
        "not_utf8", ReasonKind.LABEL_PROBLEM,
        "The line is not UTF-8 and was read as Windows-1252/Latin-1 (a warning)",
    )
    IGNORED_COLUMN = (
        "ignored_column", ReasonKind.LABEL_PROBLEM,
        "The header names a column covid-cxr does not use (a warning)",
    )
    BAD_ROW = (
        "bad_row", ReasonKind.LABEL_PROBLEM,
        "The row is not a CSV record, or has another number of fields than the header; skipped",
    )
    MISSING_KEY = (
        "missing_key", ReasonKind.LABEL_PROBLEM,
        "The row gives no StudyInstanceUID, SOPInstanceUID or AccessionNumber; skipped",
    )
    SEVERAL_KEYS = (
        "several_keys", ReasonKind.LABEL_PROBLEM,
        "The row gives more than one key; skipped",
    )
    BAD_KEY = (
        "bad_key", ReasonKind.LABEL_PROBLEM,
        "The key is longer than 64 characters, or a UID that is not digits and dots; skipped",
    )
    UNKNOWN_LABEL = (
        "unknown_label", ReasonKind.LABEL_PROBLEM,
        "The label is not one of the model's classes (covid, normal); skipped",
    )
    BAD_SOURCE = (
        "bad_source", ReasonKind.LABEL_PROBLEM,
        "The source is empty or longer than 64 characters; skipped",
    )
    BAD_DATE = (
        "bad_date", ReasonKind.LABEL_PROBLEM,
        "The date is not YYYY-MM-DD or YYYYMMDD; skipped",
    )
    DUPLICATE_KEY = (
        "duplicate_key", ReasonKind.LABEL_PROBLEM,
        "The key repeats: with the same label the repeats are ignored (a warning), with different labels none "
        "is loaded",
    )
    UNKNOWN_KEY = (
        "unknown_key", ReasonKind.LABEL_PROBLEM,
        "No received study or instance has the key; skipped",
    )

    # --- stuck inbox entries (ingest; listed by `covid-cxr status`) -------------------------------
    NOT_A_REGULAR_FILE = (
        "not_a_regular_file", ReasonKind.STUCK,
        "A symbolic link, folder link, named pipe, socket or device in the inbox: never followed or opened, "
        "left where it is",
    )
    UNREADABLE = (
        "unreadable", ReasonKind.STUCK,
        "The service's user may not read the file (or list the folder); fix its permissions",
    )
    NAME_TOO_LONG = (
        "name_too_long", ReasonKind.STUCK,
        "The path is longer than the file system lets a program open (PATH_MAX); move it higher up",
    )
    INGEST_ERROR = (
        "ingest_error", ReasonKind.STUCK,
        "Recording the file failed (database or disk unreachable, say); the message has the cause",
    )

    # --- deliveries (results sent as DICOM) --------------------------------------------------------
    DESTINATION_UNREACHABLE = (
        "destination_unreachable", ReasonKind.DELIVERY,
        "No association could be opened: connection refused, timed out or aborted by the peer",
    )
    ASSOCIATION_REJECTED = (
        "association_rejected", ReasonKind.DELIVERY,
        "The destination rejected the association (wrong AE titles, or it is busy); the message carries "
        "result, source and diagnostic",
    )
    SR_NOT_ACCEPTED = (
        "sr_not_accepted", ReasonKind.DELIVERY,
        "The destination accepted the association but not the Comprehensive SR storage class with an "
        "uncompressed transfer syntax",
    )
    STORE_FAILED = (
        "store_failed", ReasonKind.DELIVERY,
        "The destination answered the C-STORE with a failure status (the message gives it in hex, e.g. 0xA700 "
        "out of resources)",
    )
    NO_RESPONSE = (
        "no_response", ReasonKind.DELIVERY,
        "The C-STORE got no response: the association was aborted or timed out mid-transfer",
    )
    WRITE_FAILED = (
        "write_failed", ReasonKind.DELIVERY,
        "A folder destination could not be written (permissions, disk full, missing mount)",
    )
    UNKNOWN_DESTINATION = (
        "unknown_destination", ReasonKind.DELIVERY,
        "The row names a destination that is no longer configured; it is dead-lettered at once",
    )
    SOURCE_UNAVAILABLE = (
        "source_unavailable", ReasonKind.DELIVERY,
        "A report could not be made: an evaluated image's archived DICOM file (instances.stored_path) is "
        "missing or unreadable, so its patient and study attributes are unknown",
    )
