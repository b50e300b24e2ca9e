"""De-identification at read time: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with keyed pseudonyms.

What is done to a dataset (:func:`deidentify`, which edits it in place):

* Every private element is removed (odd groups, at every nesting level), as are overlay
  data and comments ``(60xx,3000)``/``(60xx,4000)`` and retired curve groups ``(50xx,xxxx)``.
* Each attribute in :data:`BASIC_PROFILE` is handled by its Table E.1-1 action code,
  at every nesting level. Where the profile offers a choice the most conservative
  allowed one is applied: ``X`` (remove) when it is allowed, else ``Z`` (zero length),
  else ``D`` (a dummy value). ``U`` replaces a UID by ``2.25.<decimal>`` built from
  ``HMAC-SHA256(key, old UID)``, so the same UID maps to the same new one in every file
  and every call with the same key (series stay together; references stay valid).
* Patient ID is replaced by a keyed pseudonym (32 hex digits of
  ``HMAC-SHA256(key, "patient-id" || PatientID)``) instead of being emptied, so studies
  of one patient still group together; Study ID by 16 hex digits of a keyed hash; the
  Study Instance UID by its keyed UID. The profile allows ``Z`` (zero length or dummy
  value) for Patient ID and Study ID; the record lists these as ``D`` (dummy value).
* Dates and times are emptied or removed as their codes say (no date shifting), and
  Longitudinal Temporal Information Modified is set to ``REMOVED``.
* Patient Identity Removed is set to ``YES``, De-identification Method to a text naming
  this profile, and De-identification Method Code Sequence to DCM 113100.
* The file meta Media Storage SOP Instance UID follows the new SOP Instance UID.

Attributes that are neither private nor in :data:`BASIC_PROFILE` are kept in the dataset
(the table is the subset of Table E.1-1 implemented here, not all of it); the readers'
``meta`` dicts are built from an allow-list of technical attributes, so nothing outside
that list reaches them whatever the dataset holds. Pixel data are not inspected for
burned-in text (the profile's Clean Pixel Data option is not implemented).

Original values are read from the undecoded bytes, never converted, logged or put into
an exception. A :class:`DeidRecord` lists ``(tag, keyword, action)`` for every change.

Keys are explicit: :class:`DeidConfig` has no default key. :meth:`DeidConfig.development`
returns a config with a fixed, public, development-only key; its records say so
(``DeidRecord.development_key``). Pseudonyms made with it protect nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

#: Attribute keyword -> PS3.15 Table E.1-1 Basic Profile action code (the subset implemented).
BASIC_PROFILE: dict[str, str] = {
    # Patient identity and demographics
    "PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z", "PatientSex": "Z",
    "IssuerOfPatientID": "X", "PatientBirthTime": "X", "OtherPatientIDs": "X",
    "OtherPatientNames": "X", "OtherPatientIDsSequence": "X", "PatientBirthName": "X",
    "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X", "PatientAddress": "X",
    "PatientMotherBirthName": "X", "PatientTelephoneNumbers": "X", "EthnicGroup": "X",
    "Occupation": "X", "AdditionalPatientHistory": "X", "PatientComments": "X",
    "PatientReligiousPreference": "X", "PatientSexNeutered": "X/Z", "MedicalRecordLocator": "X",
    "MedicalAlerts": "X", "Allergies": "X", "CountryOfResidence": "X", "RegionOfResidence": "X",
    "SmokingStatus": "X", "PregnancyStatus": "X", "LastMenstrualDate": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "ResponsiblePerson": "X", "ResponsibleOrganization": "X",
    "ReferencedPatientSequence": "X", "PatientState": "X", "CurrentPatientLocation": "X",
    "PatientInstitutionResidence": "X", "AdmissionID": "X", "AdmittingDiagnosesDescription": "X",
    # Institution, staff, equipment
    "InstitutionName": "X/Z/D", "InstitutionAddress": "X", "InstitutionCodeSequence": "X/Z/D",
    "InstitutionalDepartmentName": "X", "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ConsultingPhysicianName": "Z", "PhysiciansOfRecord": "X", "PerformingPhysicianName": "X",
    "NameOfPhysiciansReadingStudy": "X", "OperatorsName": "X/Z/D", "RequestingPhysician": "X",
    "ScheduledPerformingPhysicianName": "X", "StationName": "X/Z/D",
    "DeviceSerialNumber": "X/Z/D", "DetectorID": "X/D", "PlateID": "X", "GeneratorID": "X",
    "CassetteID": "X", "GantryID": "X", "PerformedStationAETitle": "X",
    "PerformedStationName": "X", "PerformedLocation": "X", "ScheduledStationAETitle": "X",
    "VerifyingObserverName": "D", "VerifyingOrganization": "X",
    "VerifyingObserverIdentificationCodeSequence": "Z", "PersonName": "D",
    "PersonAddress": "X", "PersonTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "ConsultingPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "PerformingPhysicianIdentificationSequence": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "OperatorIdentificationSequence": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    # Study, order and procedure identifiers and descriptions
    "AccessionNumber": "Z", "StudyID": "Z", "StudyDescription": "X", "SeriesDescription": "X",
    "ProtocolName": "X/D", "RequestAttributesSequence": "X", "RequestedProcedureID": "X",
    "RequestedProcedureDescription": "X/Z", "RequestingService": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z", "FillerOrderNumberImagingServiceRequest": "Z",
    "PerformedProcedureStepID": "X", "PerformedProcedureStepDescription": "X",
    "ScheduledProcedureStepDescription": "X", "AcquisitionProtocolDescription": "X",
    "ReferencedStudySequence": "X/Z", "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedImageSequence": "X/Z/U*", "OriginalAttributesSequence": "X",
    "ContrastBolusAgent": "Z/D",
    # Dates and times
    "StudyDate": "Z", "StudyTime": "Z", "ContentDate": "Z/D", "ContentTime": "Z/D",
    "SeriesDate": "X/D", "SeriesTime": "X/D", "AcquisitionDate": "X/D",
    "AcquisitionTime": "X/D", "AcquisitionDateTime": "X/D", "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D", "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X", "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X", "OverlayDate": "X", "OverlayTime": "X", "CurveDate": "X",
    "CurveTime": "X", "TimezoneOffsetFromUTC": "X",
    # Free text
    "ImageComments": "X", "StudyComments": "X", "FrameComments": "X",
    "AcquisitionComments": "X", "IdentifyingComments": "X",
    "CommentsOnThePerformedProcedureStep": "X", "RequestedProcedureComments": "X",
    "ImagingServiceRequestComments": "X", "TextValue": "X", "ContentSequence": "X",
    # UIDs
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U", "SynchronizationFrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U", "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U", "InstanceCreatorUID": "U", "UID": "U",
    "IrradiationEventUID": "U", "DeviceUID": "U", "DimensionOrganizationUID": "U",
    "ConcatenationUID": "U", "StorageMediaFileSetUID": "U", "TransactionUID": "U",
}

_TAGS: dict[int, tuple[str, str]] = {
    int(tag_for_keyword(kw)): (kw, code) for kw, code in BASIC_PROFILE.items()
}
_DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000"}
_PATIENT_ID = 0x00100020
_STUDY_ID = 0x00200010
_SOP_INSTANCE_UID = 0x00080018
#: De-identification Method (0012,0063) text; LO, so at most 64 characters.
METHOD = "PS3.15 E.1 Basic Profile; keyed HMAC-SHA256 pseudonyms (medseek)"
_DEV_KEY = b"medseek-DEVELOPMENT-ONLY-deid-key: public, protects nothing"


def applied_action(code: str) -> str:
    """The action carried out for a Table E.1-1 code: X if allowed, else Z, else D, else U."""
    options = code.replace("*", "").split("/")
    for choice in ("X", "Z", "D", "U"):
        if choice in options:
            return choice
    raise ValueError(f"unknown PS3.15 action code {code!r}")


@dataclass(frozen=True)
class DeidConfig:
    """Configuration of read-time de-identification.

    Attributes
    ----------
    key : bytes
        Secret HMAC-SHA256 key, at least 16 bytes. Required: there is no default.
    development_key : bool
        True only for :meth:`development`; recorded in every :class:`DeidRecord`.
    """

    key: bytes = field(repr=False)
    development_key: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, (bytes, bytearray)):
            raise TypeError(f"DeidConfig.key must be bytes, got {type(self.key).__name__}")
        if len(self.key) < 16:
            raise ValueError(f"DeidConfig.key must be at least 16 bytes, got {len(self.key)} bytes")

    @classmethod
    def development(cls) -> "DeidConfig":
        """A config with a fixed, publicly known key, for tests and demos only."""
        return cls(key=_DEV_KEY, development_key=True)

    def digest(self, kind: str, value: bytes) -> bytes:
        """``HMAC-SHA256(key, kind || 0x00 || value)``."""
        return hmac.new(bytes(self.key), kind.encode("ascii") + b"\x00" + value, hashlib.sha256).digest()

    def pseudonym_uid(self, uid: str) -> str:
        """A new UID ``2.25.<128-bit decimal>`` keyed on ``uid`` (PS3.5 B.2 UUID-derived form)."""
        return "2.25." + str(int.from_bytes(self.digest("uid", uid.encode("ascii"))[:16], "big"))


@dataclass(frozen=True)
class DeidRecord:
    """What :func:`deidentify` did to one dataset.

    Attributes
    ----------
    actions : tuple of (str, str, str)
        ``(tag, keyword, action)``, e.g. ``("(0010,0010)", "PatientName", "Z")``; private
        elements have keyword ``"private"``. One entry per tag, in first-seen order.
    patient_pseudonym : str or None
        Keyed pseudonym of Patient ID; None when the dataset had no Patient ID.
    study_pseudonym, series_pseudonym, sop_pseudonym : str or None
        The new Study/Series/SOP Instance UIDs.
    method : str
        The text written to De-identification Method (0012,0063).
    development_key : bool
        True when the public development key was used.
    """

    actions: tuple[tuple[str, str, str], ...]
    patient_pseudonym: str | None
    study_pseudonym: str | None
    series_pseudonym: str | None
    sop_pseudonym: str | None
    method: str = METHOD
    development_key: bool = False

    def action_for(self, keyword: str) -> str | None:
        """The action applied to ``keyword``, or None if it was not present."""
        for _, kw, action in self.actions:
            if kw == keyword:
                return action
        return None


def _raw_bytes(elem: DataElement | RawDataElement) -> bytes:
    """The stored value as bytes without decoding (no validation, no warnings)."""
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"").strip(b" \x00")
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).strip(b" \x00")
    return str(value).strip().encode("utf-8")


def _vr(elem: DataElement | RawDataElement, tag: int) -> str:
    vr = elem.VR
    if not vr or vr == "UN":  # implicit VR, or explicit UN: use the dictionary's VR
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    return vr.split(" or ")[0]


class _Walker:
    def __init__(self, config: DeidConfig) -> None:
        self.config = config
        self.actions: dict[str, tuple[str, str, str]] = {}

    def note(self, tag: int, keyword: str, action: str) -> None:
        key = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        self.actions.setdefault(key, (key, keyword, action))

    def new_uid(self, elem: DataElement | RawDataElement) -> str:
        olds = [u for u in _raw_bytes(elem).decode("ascii", "replace").split("\\") if u.strip(" \x00")]
        return "\\".join(self.config.pseudonym_uid(u.strip(" \x00")) for u in olds)

    def process(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            t = int(tag)
            group, element = t >> 16, t & 0xFFFF
            if group & 1:
                del ds[tag]
                self.note(t, "private", "X")
                continue
            if (0x5000 <= group <= 0x50FF) or (0x6000 <= group <= 0x60FF and element in (0x3000, 0x4000)):
                del ds[tag]
                self.note(t, "OverlayOrCurve", "X")
                continue
            elem = ds.get_item(tag)
            vr = _vr(elem, t)
            rule = _TAGS.get(t)
            if rule is not None:
                keyword, code = rule
                self.apply(ds, t, keyword, code, elem, vr)
            elif vr == "SQ":
                for item in ds[tag].value:
                    self.process(item)

    def apply(self, ds: Dataset, tag: int, keyword: str, code: str, elem, vr: str) -> None:
        action = applied_action(code)
        if tag == _PATIENT_ID or tag == _STUDY_ID:
            old = _raw_bytes(elem)
            if old:
                digest = self.config.digest("patient-id" if tag == _PATIENT_ID else "study-id", old)
                ds[tag] = DataElement(tag, vr, digest.hex()[: 32 if tag == _PATIENT_ID else 16])
                self.note(tag, keyword, "D")
                return
        if action == "X":
            del ds[tag]
        elif action == "Z":
            ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else "")
        elif action == "U":
            ds[tag] = DataElement(tag, "UI", self.new_uid(elem))
        elif vr == "SQ":  # D on a sequence: keep the items, de-identify their contents
            for item in ds[tag].value:
                self.process(item)
        else:
            ds[tag] = DataElement(tag, vr, _DUMMY.get(vr, "ANONYMIZED"))
        self.note(tag, keyword, action)


def deidentify(ds: Dataset, config: DeidConfig) -> DeidRecord:
    """De-identify ``ds`` in place (see the module docstring) and say what was done.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset as read by :func:`pydicom.dcmread`; pixel data is left untouched.
    config : DeidConfig
        Holds the pseudonym key.

    Returns
    -------
    DeidRecord

    Notes
    -----
    Call it once per dataset: a second call would key the pseudonyms of the first.
    """
    if not isinstance(config, DeidConfig):
        raise TypeError(f"config must be a DeidConfig, got {type(config).__name__}")
    patient = ds.get_item(_PATIENT_ID)
    patient_raw = _raw_bytes(patient) if patient is not None else b""
    walker = _Walker(config)
    walker.process(ds)

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
        # deleted first: assigning over it would convert (and validate, and quote in a
        # warning) the original UID
        del meta["MediaStorageSOPInstanceUID"]
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        walker.note(0x00020003, "MediaStorageSOPInstanceUID", "U")

    def uid(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value else None

    return DeidRecord(
        actions=tuple(walker.actions.values()),
        patient_pseudonym=config.digest("patient-id", patient_raw).hex()[:32] if patient_raw else None,
        study_pseudonym=uid("StudyInstanceUID"),
        series_pseudonym=uid("SeriesInstanceUID"),
        sop_pseudonym=uid("SOPInstanceUID"),
        development_key=config.development_key,
    )
