"""Helpers shared by every test folder: independent references and input builders."""
