"""ctredge.train"""
