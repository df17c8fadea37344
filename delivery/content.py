"""Building blocks of the result reports: the coded concepts, the provenance, and one measurement group per finding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

#: Designator of the few concepts no standard terminology names (PS3.16 8.2: private schemes start with 99).
LOCAL_SCHEME = "99COVIDCXR"
LOCAL_SCHEME_NAME = "covid-cxr local codes"

#: The procedure the report is about.
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: The finding each measurement group is about.
COVID_19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
#: The qualitative evaluation: "Suspected COVID-19" = Yes | No (P(covid) >= threshold).
SUSPECTED_COVID_19 = hd.sr.CodedConcept("840544004", "SCT", "Suspected COVID-19")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
#: The model's score and the threshold that turned it into Yes/No (dimensionless).
COVID_PROBABILITY = hd.sr.CodedConcept("PROB_COVID", LOCAL_SCHEME, "Probability of COVID-19 (model output)")
DECISION_THRESHOLD = hd.sr.CodedConcept("THRESHOLD", LOCAL_SCHEME, "Decision threshold")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")

#: Shown in every report, as a root-level comment and in the series description.
RESEARCH_USE_STATEMENT = (
    "RESEARCH USE ONLY. Not a medical device; not for diagnosis or any clinical decision. This result was made "
    "automatically by a machine-learning model and has not been verified by a clinician."
)
SERIES_DESCRIPTION = "covid-cxr AI result - RESEARCH USE ONLY"
#: Who made the object (General Equipment and SR Document General modules).
MANUFACTURER = "covid-cxr"


@dataclass(frozen=True)
class Provenance:
    """The model behind a result, as the database records it (``models``, ``predictions``)."""

    model_name: str
    model_version: str
    model_sha256: str
    preprocessing_version: str
    threshold: float
    software_version: str

    @property
    def device_uid(self) -> str:
        """A UID for this exact model artifact (derived from its sha256): the Device Observer UID."""
        return str(generate_uid(prefix=None, entropy_srcs=[self.model_sha256]))

    def algorithm(self, rule: str | None = None) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification: name, version and the parameters that make the result reproducible."""
        parameters = [f"sha256={self.model_sha256}", f"preprocessing={self.preprocessing_version}",
                      f"threshold={self.threshold:g}"]
        if rule:
            parameters.append(f"study rule={rule}")
        return hd.sr.AlgorithmIdentification(name=self.model_name, version=self.model_version,
                                             parameters=parameters, manufacturer=MANUFACTURER)

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The Contributing Equipment Sequence item naming the model, as IHE AI Results asks of AI results."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=[self.model_version, self.preprocessing_version, f"covid-cxr {self.software_version}"],
            contribution_description=(
                f"AI inference: model {self.model_name} version {self.model_version} (sha256 {self.model_sha256}), "
                f"preprocessing {self.preprocessing_version}, decision threshold {self.threshold:g}"),
        )

    def observation_context(self) -> hd.sr.ObservationContext:
        """TID 1002: the observer is a device, the model."""
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=self.device_uid, name=f"{self.model_name} {self.model_version}"[:64], manufacturer_name=MANUFACTURER,
            model_name=self.model_name)
        return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))


@dataclass(frozen=True)
class Finding:
    """One COVID-19 evaluation: the probability, the Yes/No it gave, and the images it was taken over."""

    tracking_identifier: str
    tracking_uid: str
    prob_covid: float
    threshold: float
    images: Sequence[Dataset]

    @property
    def suspected(self) -> bool:
        return self.prob_covid >= self.threshold

    def measurement_group(self, provenance: Provenance, rule: str | None = None
                          ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        """TID 1501: finding COVID-19, the probability and threshold (NUM), Suspected COVID-19 Yes/No (CODE)."""
        algorithm = provenance.algorithm(rule)
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=self.tracking_uid, identifier=self.tracking_identifier),
            finding_type=COVID_19,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=COVID_PROBABILITY, value=self.prob_covid, unit=NO_UNITS),
                hd.sr.Measurement(name=DECISION_THRESHOLD, value=self.threshold, unit=NO_UNITS),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=SUSPECTED_COVID_19, value=YES if self.suspected else NO),
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup(image.SOPClassUID, image.SOPInstanceUID)
                           for image in self.images],
        )


def research_use_comment() -> hd.sr.TextContentItem:
    """The statement every report carries at its root."""
    return hd.sr.TextContentItem(name=COMMENT, value=RESEARCH_USE_STATEMENT,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item declaring :data:`LOCAL_SCHEME`."""
    return CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME,
                                          responsible_organization=MANUFACTURER)
