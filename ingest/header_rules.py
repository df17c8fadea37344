"""The header rules of the quality checks: a subject that is not human, and a view named only in descriptions.

Both weigh coded elements over free text. Species: a species element decides either way (one
naming *Homo sapiens* even overrides every word elsewhere); breed, neutering and an owner are
only recorded for animals; then words: names of animals or of veterinary medicine in
descriptions and the institution, and only unmistakable ones (``CANINE``, ``VETERINARY``) in the
names of people, because "Cat", "Fox" or "Bird" are people's names too. View, when
ViewPosition is empty: the coded View Code Sequence, then the image's own descriptions, then
the study's, in the order the body-part inference uses: the first text that names a frontal
view ends the search (``PA AND LAT`` describes a study of two views), the first that names a
lateral, decubitus or oblique one decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pydicom

from ingest.metadata import InstanceMetadata
from ingest.quality import QualityCheck, QualityPolicy, decide, raise_if_rejected

#: Names the behaviour of these rules; stored with every outcome they record.
HEADER_RULES_VERSION = "header-rules-1"

#: Words of a species element (or its code meaning) that name a human.
HUMAN_SPECIES_WORDS = frozenset({"HOMO", "SAPIENS", "HUMAN", "HUMANS"})
#: Code values of *Homo sapiens*: SNOMED CT 337915000 and the older SNOMED RT L-85B00 (CID 7454).
HUMAN_SPECIES_CODES = frozenset({"337915000", "L-85B00"})
#: Elements only recorded for an animal (PS3.3 C.7.1.1): present and not empty means not human.
ANIMAL_ONLY_ELEMENTS = ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
                        "PatientSexNeutered")
#: ResponsiblePersonRole values that mean the patient is an animal.
ANIMAL_RESPONSIBLE_ROLES = frozenset({"OWNER", "VETERINARIAN"})
#: Words that only name animals or veterinary medicine: evidence wherever they stand.
VETERINARY_WORDS = frozenset({
    "CANINE", "FELINE", "EQUINE", "BOVINE", "PORCINE", "OVINE", "CAPRINE", "MURINE", "LEPORINE", "AVIAN",
    "VETERINARY", "VETERINARIAN", "VETERINARIANS", "VETERINAIRE", "VETERINARIA", "VETERINARIO", "VETERINAR",
    "VETMED", "TIERARZT", "TIERKLINIK", "TIERARZTPRAXIS", "TIERAERZTLICHE", "DIERENARTS", "DIERENKLINIEK", "K9",
})
#: Common names of animals: evidence in descriptions and the institution only (never in a person's name).
#: Not here: PET (a PET scan), CALF (the lower leg), which also describe human examinations.
ANIMAL_WORDS = frozenset({
    "DOG", "DOGS", "PUPPY", "CAT", "CATS", "KITTEN", "HORSE", "PONY", "FOAL", "RABBIT", "FERRET", "RAT", "RATS",
    "MOUSE", "MICE", "HAMSTER", "PIG", "PIGLET", "COW", "SHEEP", "GOAT", "PARROT", "BIRD", "REPTILE", "TORTOISE",
    "ANIMAL", "ANIMALS",
})
#: Free text read for species words, most specific first: what the examination is, then where it was made.
DESCRIPTION_KEYWORDS = ("AcquisitionDeviceProcessingDescription", "SeriesDescription", "ProtocolName",
                        "StudyDescription", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
                        "ImageComments", "InstitutionName", "InstitutionalDepartmentName")
#: Names of people (and the responsible organization): only VETERINARY_WORDS count there.
NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "ResponsiblePerson", "ResponsibleOrganization",
                 "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")

#: Words of a description naming a frontal view.
FRONTAL_WORDS = frozenset({"PA", "AP", "FRONTAL", "FRONT", "POSTEROANTERIOR", "ANTEROPOSTERIOR", "PAAP"})
#: Words naming a lateral view ("LAT" only as a word of its own: "LATERALITY" or "PLATE" are not).
LATERAL_WORDS = frozenset({"LATERAL", "LAT", "LATERALE", "LATERAAL", "LATERALIS", "LLAT", "RLAT"})
#: Words naming a decubitus or an oblique view: neither frontal nor lateral, like such a ViewPosition.
DECUBITUS_WORDS = frozenset({"DECUBITUS", "DECUB", "LLD", "RLD"})
OBLIQUE_WORDS = frozenset({"OBLIQUE", "OBL", "OBLIQUA", "RAO", "LAO", "RPO", "LPO", "LLO", "RLO"})
#: Where a view is looked for when ViewPosition is empty, after the View Code Sequence: the image's
#: own descriptions, then the study's.
VIEW_DESCRIPTION_KEYWORDS = ("AcquisitionDeviceProcessingDescription", "SeriesDescription", "ProtocolName",
                             "StudyDescription", "RequestedProcedureDescription",
                             "PerformedProcedureStepDescription")


def check_header_rules(ds: pydicom.Dataset, metadata: InstanceMetadata,
                       policy: QualityPolicy) -> tuple[tuple[str, ...], tuple[QualityCheck, ...]]:
    """The flags and outcomes of the species and described-view rules; rejects as their policies say.

    Raises :class:`~ingest.quality.QualityRejected` (``not_human``, ``lateral_view``) when a
    rule fires and its policy is ``reject``. A decubitus or oblique view named in a description
    is flagged ``view_not_frontal``, as the same ViewPosition would be.
    """
    checks: list[QualityCheck] = []
    flags: list[str] = []
    messages: dict[str, str] = {}
    evidence = non_human_evidence(ds)
    if evidence is not None:
        checks.append(_fired("species", policy.species, "not_human", evidence))
        messages["species"] = f"the subject is not human: {evidence}"
    if not (metadata.view_position or "").strip():
        described = described_view(ds)
        if described is not None:
            keyword, view = described
            if view == "lateral":
                checks.append(_fired("described_view", policy.described_view, "lateral_view", keyword))
                messages["described_view"] = f"ViewPosition is empty and {keyword} names a lateral view"
            else:
                flags.append("view_not_frontal")
    outcome = tuple(checks)
    raise_if_rejected(outcome, messages)
    flags += [check.flag for check in outcome if check.flag is not None]
    return tuple(flags), outcome


def _fired(check: str, policy: str, finding: str, evidence: str) -> QualityCheck:
    decision = decide(policy, fired=True, confident=True)
    return QualityCheck(check, decision, finding, None, True, HEADER_RULES_VERSION, evidence=evidence)


def non_human_evidence(ds: pydicom.Dataset) -> str | None:
    """What says the subject is an animal (an element name, with the value where it names no person), else ``None``.

    ``None`` as well when a species element names a human: tags weigh more than free text.
    """
    species = _text(ds, "PatientSpeciesDescription")
    if species:
        return None if _words(species) & HUMAN_SPECIES_WORDS else f"PatientSpeciesDescription is {species!r}"
    for code_value, meaning in _codes(ds, "PatientSpeciesCodeSequence"):
        if code_value in HUMAN_SPECIES_CODES or _words(meaning) & HUMAN_SPECIES_WORDS:
            return None
        return f"PatientSpeciesCodeSequence is {meaning or code_value!r}"
    for keyword in ANIMAL_ONLY_ELEMENTS:
        if _present(ds, keyword):
            return f"{keyword} is present (recorded only for animals)"
    role = _text(ds, "ResponsiblePersonRole").upper()
    if role in ANIMAL_RESPONSIBLE_ROLES:
        return f"ResponsiblePersonRole is {role}"
    for keyword in DESCRIPTION_KEYWORDS:
        found = sorted(_words(_text(ds, keyword)) & (VETERINARY_WORDS | ANIMAL_WORDS))
        if found:
            return f"{keyword} names {found[0]}"
    for keyword in NAME_KEYWORDS:
        if _words(_text(ds, keyword)) & VETERINARY_WORDS:
            return f"{keyword} holds a veterinary word"  # a person's name is never shown
    return None


def described_view(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """(keyword, ``lateral`` / ``decubitus`` / ``oblique``) when a code or description names such a view first.

    Texts are read in precedence order (View Code Sequence, the image's descriptions, the
    study's); within one text a decubitus beats everything ("LEFT LATERAL DECUBITUS" is a
    frontal projection with a horizontal beam), then an oblique; a text that names a frontal
    view ends the search with ``None``; then a lateral decides.
    """
    for keyword, text in _view_texts(ds):
        words = _words(text.replace("-", ""))
        if words & DECUBITUS_WORDS:
            return keyword, "decubitus"
        if words & OBLIQUE_WORDS:
            return keyword, "oblique"
        if words & FRONTAL_WORDS:
            return None
        if words & LATERAL_WORDS:
            return keyword, "lateral"
    return None


def _view_texts(ds: pydicom.Dataset) -> Iterator[tuple[str, str]]:
    for _, meaning in _codes(ds, "ViewCodeSequence"):
        yield "ViewCodeSequence", meaning
    for keyword in VIEW_DESCRIPTION_KEYWORDS:
        yield keyword, _text(ds, keyword)


def _words(text: str) -> set[str]:
    return set(re.split(r"[^A-Z0-9]+", text.upper())) - {""}


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """The element's value as text ("" when absent, empty or unreadable); multi-valued elements joined."""
    try:
        value = ds.get(keyword)
    except Exception:  # a damaged value is no evidence either way
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return " ".join(str(v) for v in value)
    return str(value).strip()


def _present(ds: pydicom.Dataset, keyword: str) -> bool:
    """Whether the element holds something: a non-blank value, or a sequence with items."""
    try:
        value = ds.get(keyword)
    except Exception:  # a damaged value is no evidence either way
        return False
    if isinstance(value, pydicom.multival.MultiValue | list):
        return len(value) > 0
    return value is not None and str(value).strip() != ""


def _codes(ds: pydicom.Dataset, keyword: str) -> list[tuple[str, str]]:
    """(CodeValue, CodeMeaning) of each item of a code sequence; a damaged sequence has none."""
    try:
        return [(str(item.get("CodeValue", "") or "").strip(), str(item.get("CodeMeaning", "") or "").strip())
                for item in ds.get(keyword) or []]
    except Exception:  # a damaged sequence is no evidence either way
        return []
