package com.example.warapp;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.util.Properties;

/** The release's facts, filtered into war-app.properties by the build. */
final class Release {
    private Release() {}

    static Properties load() {
        Properties p = new Properties();
        try (InputStream in = Release.class.getResourceAsStream("/war-app.properties")) {
            p.load(in);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return p;
    }
}
