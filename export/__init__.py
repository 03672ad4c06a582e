"""ctredge.export"""
