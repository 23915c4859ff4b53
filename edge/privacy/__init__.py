"""On-device privacy: keys, pseudonyms, scrubbing, consent, and the pipeline stages.

No raw personal identifier (Bluetooth address, NFC UID, loyalty number, card number,
e-mail, phone) passes the privacy stage, gets stored, or gets logged.
"""
